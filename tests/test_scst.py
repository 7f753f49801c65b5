"""SCST: reward = pycocoevalcap's CIDEr-D / BLEU-4, baselines by hand, loss and gradient sign, edge cases, and
an end-to-end XE -> SCST run through ``python -m updown.fit``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_SPEC
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

import updown.tasks.scst as scst
from updown.data.base import DataSpec
from updown.data.vocabulary import SPECIAL_TOKENS, Vocabulary
from updown.decoding import BeamSearchConfig, beam_candidates, beam_search, greedy_decode
from updown.fit import main
from updown.losses import self_critical_baseline
from updown.metrics.bleu import SentenceBleu
from updown.metrics.cider import CiderD
from updown.models.captioner import CaptionerConfig
from updown.tasks.scst import SCSTCaptioningTask

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["a", "dog", "cat", "red", "bus", "on", "the", "street", "big", "sits"]
VOCABULARY = Vocabulary([*SPECIAL_TOKENS, *WORDS])
REFERENCES = {
    7: [["a", "red", "dog"], ["the", "dog", "sits"], ["a", "dog", "on", "the", "street"]],
    9: [["a", "big", "bus"], ["the", "red", "bus"], ["a", "bus", "on", "the", "street"]],
    11: [["a", "cat"], ["the", "cat", "sits", "on", "the", "street"]],
}
FEATURE_SIZE = 6
NET = CaptionerConfig(embedding_size=8, hidden_size=16, attention_size=8)


def spec_of(vocabulary: Vocabulary) -> DataSpec:
    return DataSpec(FEATURE_SIZE, None, {"caption": vocabulary.tokens})


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: one thread is faster, and intra-op threads stall badly when other jobs share the 2 cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_task(max_length: int = 6, dropout: float = 0.0, **kwargs) -> SCSTCaptioningTask:
    torch.manual_seed(0)
    task = SCSTCaptioningTask(
        net=NET.replace(dropout=dropout), decoding=BeamSearchConfig(max_length=max_length), **kwargs
    )
    task.setup_model(spec_of(VOCABULARY))
    task._cider = CiderD.from_references(
        REFERENCES, eos_as_word=kwargs.get("eos_as_word", False), cache_references=False
    )
    task._train_references = REFERENCES
    task.logged = {}
    task.log = lambda key, value, **_: task.logged.__setitem__(key, value)
    return task


def make_batch(image_ids: list[int], num_boxes: int = 4) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "image_id": torch.tensor(image_ids),
        "image_features": torch.rand(len(image_ids), num_boxes, FEATURE_SIZE, generator=generator),
        "image_features_mask": torch.ones(len(image_ids), num_boxes, dtype=torch.bool),
    }


def encode(words: list[str], length: int, eos: bool = True) -> list[int]:
    ids = VOCABULARY.encode(words, add_bos_eos=False) + ([VOCABULARY.eos_index] if eos else [])
    return ids + [VOCABULARY.pad_index] * (length - len(ids))


def pycocoevalcap_scores(
    scorer, hypotheses: dict[int, list[str]], suffix: list[str], unended: tuple[int, ...] = ()
) -> np.ndarray:
    """pycocoevalcap's per-image scores; ``suffix`` (``["<eos>"]``) goes on every reference and on every hypothesis
    except those of the images in ``unended`` (samples cut before emitting ``<eos>``)."""
    gts = {image: [" ".join(ref + suffix) for ref in refs] for image, refs in REFERENCES.items()}
    res = {image: [" ".join(hypotheses[image] + ([] if image in unended else suffix))] for image in REFERENCES}
    return np.asarray(scorer.compute_score(gts, res)[1])


@pytest.mark.parametrize("eos_as_word", [False, True])
def test_reward_is_pycocoevalcap_cider_d_on_the_training_references(eos_as_word):
    task = make_task(eos_as_word=eos_as_word)
    task._register_references([7, 9, 11])
    # A sample cut at the maximum length (no <eos>) is scored on all its words, and without an "<eos>" word (as
    # self-critical.pytorch scores it); <unk> never matches a reference.
    hypotheses = {
        7: ["a", "dog", "sits"],
        9: ["a", "red", "bus", "on", "the", "street"],
        11: ["a", "<unk>", "cat"],
    }
    tokens = torch.tensor(
        [encode(hypotheses[7], 6), encode(hypotheses[9], 6, eos=False), encode(["a", "<unk>", "cat"], 6)]
    )
    lengths = torch.tensor([4, 6, 4])
    rewards = task.rewards(tokens, lengths, [7, 9, 11])
    # pycocoevalcap counts document frequencies over the scored references, as the cached df here does.
    expected = pycocoevalcap_scores(Cider(), hypotheses, ["<eos>"] if eos_as_word else [], unended=(9,))
    np.testing.assert_allclose(rewards, expected, rtol=1e-9, atol=1e-12)
    assert rewards[0] > 0.5 and rewards.min() >= 0


def test_sentence_bleu_matches_pycocoevalcap_and_mixes_into_the_reward():
    hypotheses = {7: ["a", "red", "dog", "sits", "on", "the", "street"], 9: ["bus"], 11: []}
    bleu = SentenceBleu()
    for image, refs in REFERENCES.items():
        bleu.add_references(image, refs)
    expected = pycocoevalcap_scores(Bleu(4), hypotheses, [])[3]
    np.testing.assert_allclose(
        bleu.score(list(hypotheses.values()), [7, 9, 11]), expected, rtol=1e-9, atol=1e-15
    )

    task = make_task(bleu_weight=0.5, cider_weight=2.0)
    task._register_references([7, 9, 11])
    tokens = torch.tensor([encode(hypotheses[7], 8), encode(hypotheses[9], 8), encode([], 8)])
    cider = pycocoevalcap_scores(Cider(), hypotheses, [])
    rewards = task.rewards(tokens, torch.tensor([8, 2, 1]), [7, 9, 11])
    np.testing.assert_allclose(rewards, 2.0 * cider + 0.5 * expected, rtol=1e-9)


def test_baselines_by_hand():
    reward = np.random.default_rng(0).random((3, 4))
    others = self_critical_baseline(reward, "mean_of_others")
    for image in range(3):
        for sample in range(4):
            rest = [reward[image, j] for j in range(4) if j != sample]
            assert others[image, sample] == pytest.approx(sum(rest) / 3)
    np.testing.assert_allclose(
        self_critical_baseline(reward, "beam_mean"), np.repeat(reward.mean(1, keepdims=True), 4, 1)
    )
    greedy = np.array([0.1, 0.2, 0.3])
    np.testing.assert_array_equal(self_critical_baseline(reward, "greedy", greedy)[:, 2], greedy)


def policy_logprobs(task: SCSTCaptioningTask, batch: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-probability of each sample under the sampling policy (<pad>, <bos> removed), up to <eos>."""
    inputs = torch.cat([torch.full((tokens.size(0), 1), VOCABULARY.bos_index), tokens], dim=1)
    image_index = torch.zeros(tokens.size(0), dtype=torch.long)
    with torch.no_grad():
        logits = task.model(
            batch["image_features"], batch["image_features_mask"], inputs, image_index=image_index
        )["logits"]
    logits[:, :, [VOCABULARY.pad_index, VOCABULARY.bos_index]] = float("-inf")
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(2, tokens.unsqueeze(2)).squeeze(2)
    totals = []
    for row in range(tokens.size(0)):
        ids = tokens[row].tolist()
        end = ids.index(VOCABULARY.eos_index) + 1 if VOCABULARY.eos_index in ids else len(ids)
        totals.append(float(token_logprobs[row, :end].sum()))
    return torch.tensor(totals)


def capture_samples(monkeypatch) -> list:
    captured = []

    def sample_decode(*args, **kwargs):
        captured.append(scst_sample_decode(*args, **kwargs))
        return captured[-1]

    scst_sample_decode = scst.sample_decode
    monkeypatch.setattr(scst, "sample_decode", sample_decode)
    return captured


def test_loss_is_advantage_times_sequence_logprob_and_reinforces_the_better_sample(monkeypatch):
    task = make_task(num_samples=2)
    captured = capture_samples(monkeypatch)
    task.rewards = lambda tokens, lengths, keys: np.array([1.0, 0.0])  # advantages: +1 and -1
    batch = make_batch([7])
    optimizer = torch.optim.SGD(task.parameters(), lr=0.5)
    loss = task.training_step(batch, 0)
    tokens = captured[0].tokens
    assert not torch.equal(tokens[0], tokens[1])
    before = policy_logprobs(task, batch, tokens)
    assert loss.item() == pytest.approx(-(1.0 * before[0] - 1.0 * before[1]).item() / 2, rel=1e-5)
    assert task.logged["train/baseline"] == pytest.approx(0.5) and task.logged["train/advantage_abs"] == 1.0
    loss.backward()
    optimizer.step()
    after = policy_logprobs(task, batch, tokens)
    assert after[0] > before[0]
    assert after[0] - after[1] > before[0] - before[1]


def test_samples_without_eos_are_cut_at_max_length_and_counted(monkeypatch):
    task = make_task(num_samples=4, max_length=2)
    captured = capture_samples(monkeypatch)
    loss = task.training_step(make_batch([7, 9, 11]), 0)
    tokens = captured[0].tokens
    has_eos = [VOCABULARY.eos_index in row for row in tokens.tolist()]
    assert not all(has_eos)
    assert torch.isfinite(loss)
    assert task.logged["train/no_eos_fraction"] == pytest.approx(1 - sum(has_eos) / len(has_eos))
    words = [row.index(VOCABULARY.eos_index) if VOCABULARY.eos_index in row else 2 for row in tokens.tolist()]
    assert task.logged["train/sample_length"] == pytest.approx(np.mean(words))


def test_equal_rewards_give_zero_loss_and_a_warning_and_nan_rewards_an_error():
    task = make_task(num_samples=3)
    task.rewards = lambda tokens, lengths, keys: np.full(len(keys), 0.5)
    with pytest.warns(UserWarning, match="no learning"):
        loss = task.training_step(make_batch([7, 9]), 0)
    loss.backward()
    assert loss.item() == 0.0 and task.logged["train/zero_advantage_fraction"] == 1.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in task.parameters() if p.grad is not None)

    task = make_task(num_samples=3)
    task._cider.score = lambda hypotheses, keys, ended=None: np.full(len(keys), np.nan)
    with pytest.raises(ValueError, match="non-finite rewards"):
        task.training_step(make_batch([7]), 0)


def test_greedy_baseline_is_the_reward_of_the_eval_mode_greedy_caption():
    task = make_task(num_samples=2, baseline="greedy", dropout=0.5)
    batch = make_batch([7, 9])
    task.training_step(batch, 0)
    assert task.model.training
    task.model.eval()
    state = task.model.init_state(batch["image_features"], batch["image_features_mask"])
    greedy = greedy_decode(task.model.step, state, max_length=6)
    # CIDEr-D from pycocoevalcap of the greedy caption of each image, its baseline.
    words = {7: VOCABULARY.decode(greedy.tokens[0]), 9: VOCABULARY.decode(greedy.tokens[1]), 11: ["a"]}
    expected = pycocoevalcap_scores(Cider(), words, [])[:2]
    assert task.logged["train/baseline"] == pytest.approx(expected.mean(), abs=1e-9)


def test_beam_mean_uses_the_beam_as_samples():
    task = make_task(num_samples=3, baseline="beam_mean")
    batch = make_batch([7, 9])
    state = task.model.init_state(batch["image_features"], batch["image_features_mask"])
    specials = dict(
        bos_index=VOCABULARY.bos_index, eos_index=VOCABULARY.eos_index, unk_index=VOCABULARY.unk_index
    )
    candidates = beam_candidates(task.model.step, state, beam_size=3, max_length=6, **specials)
    best = beam_search(task.model.step, state, beam_size=3, max_length=6)
    assert torch.equal(candidates[::3], best.tokens)
    assert len({tuple(row) for row in candidates[:3].tolist()}) == 3
    loss = task.training_step(batch, 0)
    assert torch.isfinite(loss) and task.logged["train/advantage"] == pytest.approx(0.0, abs=1e-12)


def save_checkpoint(path: Path, vocabulary: Vocabulary, hidden_size: int = 16) -> dict:
    torch.manual_seed(5)
    source = SCSTCaptioningTask(net=NET.replace(hidden_size=hidden_size))
    source.setup_model(spec_of(vocabulary))
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in source.model.state_dict().items()}}
    source.on_save_checkpoint(checkpoint)
    torch.save({**checkpoint, "hyper_parameters": dict(source.hparams)}, path)
    return source.model.state_dict()


def test_initial_weights_load_and_mismatches_are_named(tmp_path):
    task = make_task()
    weights = save_checkpoint(tmp_path / "xe.ckpt", VOCABULARY)
    task.load_initial_weights(str(tmp_path / "xe.ckpt"))
    assert all(torch.equal(weights[k], v) for k, v in task.model.state_dict().items())

    other = Vocabulary([*SPECIAL_TOKENS, *WORDS[:-1], "horse"])
    save_checkpoint(tmp_path / "other.ckpt", other)
    with pytest.raises(ValueError, match="Vocabulary mismatch") as error:
        task.load_initial_weights(str(tmp_path / "other.ckpt"), "data/vocabulary.json")
    assert str(tmp_path / "other.ckpt") in str(error.value) and "data/vocabulary.json" in str(error.value)
    assert "'horse' vs 'sits'" in str(error.value)

    save_checkpoint(tmp_path / "big.ckpt", VOCABULARY, hidden_size=24)
    with pytest.raises(ValueError, match="hidden_size=24"):
        task.load_initial_weights(str(tmp_path / "big.ckpt"))


def test_a_resumed_run_keeps_its_starting_scores():
    task = make_task()
    task.extra_metrics = {"start/val/cider": 1.5, "gain/val/cider": 0.1}
    checkpoint: dict = {}
    task.on_save_checkpoint(checkpoint)
    assert checkpoint["scst_start_metrics"] == {"start/val/cider": 1.5}
    assert checkpoint["data_spec"]["vocabularies"]["caption"] == VOCABULARY.tokens
    resumed = SCSTCaptioningTask(net=NET)
    resumed.on_load_checkpoint(checkpoint)
    assert resumed._resumed and resumed.extra_metrics == {"start/val/cider": 1.5}
    assert resumed.vocabulary == VOCABULARY


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"baseline": "max"}, "not one of"),
        ({"num_samples": 1}, "at least 2"),
        ({"bleu_weight": -1.0}, ">= 0"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SCSTCaptioningTask(**kwargs)


def printed_config(capsys, *configs: str) -> dict:
    args = [a for config in configs for a in ("--config", f"configs/captioning/{config}")]
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_scst_configs_keep_the_xe_model_sizes(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = printed_config(capsys, "synthetic.yaml", "synthetic_scst.yaml")
    model = config["model"]
    assert model["class_path"] == "updown.tasks.scst.SCSTCaptioningTask"
    net = model["init_args"]["net"]
    assert (net["hidden_size"], net["attention_size"]) == (256, 128)
    assert (model["init_args"]["decoding"]["beam_size"], config["data"]["init_args"]["batch_size"]) == (3, 20)
    model = printed_config(capsys, "updown_xe.yaml", "updown_scst.yaml")["model"]["init_args"]
    optimizer = model["optimizer"]
    assert (model["net"]["hidden_size"], optimizer["name"], optimizer["lr"], optimizer["schedule"]) == (
        1000, "adam", 5e-5, "constant")  # fmt: skip
    assert (model["num_samples"], model["baseline"], optimizer["weight_decay"]) == (5, "mean_of_others", 0.0)


def test_xe_then_scst_records_start_and_final_cider(tmp_path, tiny_world, monkeypatch):
    monkeypatch.chdir(ROOT)
    common = [
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        "--trainer.num_sanity_val_steps", "0", "--model.init_args.val_metrics", "[CIDEr]",
        "--model.init_args.net.embedding_size", "16", "--model.init_args.net.hidden_size", "32",
        "--model.init_args.net.attention_size", "16", "--data.init_args.data_root", str(tiny_world.root.parent),
        "--data.init_args.synthetic.num_train", str(TINY_SPEC.num_train),
        "--data.init_args.synthetic.num_val", str(TINY_SPEC.num_val),
        "--data.init_args.synthetic.num_test", str(TINY_SPEC.num_test),
        "--data.init_args.synthetic.feature_size", str(TINY_SPEC.feature_size),
    ]  # fmt: skip
    assert (
        main(
            [
                "--config",
                "configs/captioning/synthetic.yaml",
                *common,
                "--trainer.default_root_dir",
                str(tmp_path / "xe"),
            ]
        )
        == 0
    )
    xe = json.loads((tmp_path / "xe" / "lightning_logs" / "version_0" / "metrics.json").read_text())
    scst_args = [
        "--config", "configs/captioning/synthetic.yaml", "--config", "configs/captioning/synthetic_scst.yaml", *common,
        "--trainer.default_root_dir", str(tmp_path / "scst"), "--model.init_args.init_weights", xe["best_checkpoint"],
    ]  # fmt: skip
    assert main(scst_args) == 0
    run = tmp_path / "scst" / "lightning_logs" / "version_0"
    metrics = json.loads((run / "metrics.json").read_text())
    # The start pass decodes with the XE weights exactly as the XE run's last validation did.
    assert metrics["start/val/cider"] == pytest.approx(xe["val/cider"], abs=1e-9)
    assert metrics["gain/val/cider"] == pytest.approx(metrics["val/cider"] / metrics["start/val/cider"] - 1)
    assert metrics["global_step"] == 3
    logged = (run / "metrics.csv").read_text().splitlines()[0]
    for key in (
        "train/reward",
        "train/baseline",
        "train/advantage",
        "train/sample_length",
        "train/no_eos_fraction",
    ):
        assert key in logged
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["scst_start_metrics"]["start/val/cider"] == metrics["start/val/cider"]
