"""The shipped reproduction recipes equal the references they name, value by value.

Each row of ``REFERENCE`` is a setting that moves a paper-comparable number, the value of the reference
implementation, and where that value stands there (recipe audit: updown-baseline, self-critical.pytorch, the
Up-Down Caffe code, hengyuan-hu's VQA code). The configs are composed as docs/training.md composes them, so a later
edit that drifts from a reference fails with the setting's name and both values.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import ROOT, TINY_SPEC, synthetic_world_args

from updown.decoding import CAFFE_REPEATABLE_WORDS, beam_candidates
from updown.fit import main

CAFFE_XE = ("captioning/updown_xe.yaml",)
SC_XE = ("captioning/updown_xe_adam.yaml",)
SC_SCST = ("captioning/updown_xe_adam.yaml", "captioning/updown_scst.yaml")
CAFFE_SCST = ("captioning/updown_xe.yaml", "captioning/updown_scst_caffe.yaml")
HH_VQA = ("vqa/updown.yaml",)
TENEY_VQA = ("vqa/teney.yaml",)
BFAN_EQUAL = ("retrieval/bfan_equal.yaml",)
BFAN_PROB = ("retrieval/bfan_prob.yaml",)

M = "model.init_args."
D = "data.init_args."

# (configs composed, setting, reference value, where the reference sets it)
REFERENCE = [
    # The Up-Down Caffe XE recipe (peteanderson80/Up-Down-Captioner, experiments/caption_lstm/).
    (CAFFE_XE, "trainer.max_steps", 60000, "solver.prototxt max_iter"),
    (CAFFE_XE, M + "optimizer.name", "sgd", "solver.prototxt SGD"),
    (CAFFE_XE, M + "optimizer.lr", 0.01, "solver.prototxt base_lr"),
    (CAFFE_XE, M + "optimizer.momentum", 0.9, "solver.prototxt momentum"),
    (CAFFE_XE, M + "optimizer.weight_decay", 0.0005, "solver.prototxt weight_decay"),
    (CAFFE_XE, M + "optimizer.schedule", "linear", "solver.prototxt lr_policy poly, power 1"),
    (CAFFE_XE, M + "optimizer.total_steps", 60000, "solver.prototxt max_iter (the poly decay's length)"),
    (CAFFE_XE, "trainer.gradient_clip_val", 10.0, "solver.prototxt clip_gradients"),
    (CAFFE_XE, "trainer.gradient_clip_algorithm", "norm", "Caffe clips by the global norm"),
    (CAFFE_XE, M + "net.embedding_size", 1000, "net.prototxt embed num_output"),
    (CAFFE_XE, M + "net.hidden_size", 1000, "net.prototxt LSTMNode num_cells"),
    (CAFFE_XE, M + "net.attention_size", 512, "net.prototxt attention num_output"),
    (CAFFE_XE, M + "net.dropout", 0.0, "net.prototxt: no dropout"),
    (CAFFE_XE, M + "decoding.beam_size", 5, "decoder.prototxt beam_size"),
    (CAFFE_XE, M + "decoding.max_length", 20, "decoder.prototxt: 20 steps"),
    (CAFFE_XE, M + "decoding.block_repeated_words", True, "decoder.prototxt allowed_multiple"),
    (
        CAFFE_XE,
        M + "decoding.repeatable_words",
        list(CAFFE_REPEATABLE_WORDS),
        "decoder.prototxt allowed_multiple",
    ),
    (CAFFE_XE, M + "scheduled_sampling.probability", 0.0, "no scheduled sampling"),
    (CAFFE_XE, D + "train_splits", ["train", "restval"], "Karpathy train + restval (113,287 images)"),
    (CAFFE_XE, D + "max_caption_length", 20, "rcnn_layers.py: 20 tokens"),
    # self-critical.pytorch's UpDown XE recipe (configs/updown/updown.yml, captioning/utils/opts.py).
    (SC_XE, "trainer.max_epochs", 30, "updown.yml max_epochs / self_critical_after"),
    (SC_XE, "trainer.gradient_clip_val", 0.1, "opts.py grad_clip_value"),
    (SC_XE, "trainer.gradient_clip_algorithm", "value", "opts.py grad_clip_mode"),
    (SC_XE, M + "optimizer.name", "adam", "updown.yml optim"),
    (SC_XE, M + "optimizer.lr", 0.0005, "updown.yml learning_rate"),
    (SC_XE, M + "optimizer.weight_decay", 0.0, "opts.py weight_decay"),
    (SC_XE, M + "optimizer.schedule", "step", "updown.yml learning_rate_decay_start 0"),
    (SC_XE, M + "optimizer.step_size", 3, "updown.yml learning_rate_decay_every"),
    (SC_XE, M + "optimizer.gamma", 0.8, "updown.yml learning_rate_decay_rate"),
    (SC_XE, M + "net.dropout", 0.5, "opts.py drop_prob_lm"),
    (SC_XE, M + "net.hidden_size", 1000, "updown.yml rnn_size"),
    (SC_XE, M + "net.attention_size", 512, "updown.yml att_hid_size"),
    (SC_XE, M + "scheduled_sampling.start_epoch", 0, "updown.yml scheduled_sampling_start"),
    (SC_XE, M + "scheduled_sampling.probability", 0.0, "opts.py: the ramp starts at 0"),
    (SC_XE, M + "scheduled_sampling.increase_every", 5, "opts.py scheduled_sampling_increase_every"),
    (SC_XE, M + "scheduled_sampling.increase_by", 0.05, "opts.py scheduled_sampling_increase_prob"),
    (SC_XE, M + "scheduled_sampling.max_probability", 0.25, "opts.py scheduled_sampling_max_prob"),
    (SC_XE, M + "decoding.beam_size", 5, "MODEL_ZOO.md beam 5"),
    (SC_XE, M + "decoding.block_repeated_words", False, "eval_utils decoding_constraint 0"),
    (SC_XE, D + "batch_size", 10, "updown.yml batch_size"),
    (SC_XE, D + "max_caption_length", 16, "prepro_labels.py --max_length 16"),
    # self-critical.pytorch's SCST stage (configs/updown/updown_nsc.yml), composed after its XE stage.
    (SC_SCST, "trainer.max_epochs", 20, "updown_nsc.yml: max_epochs 50 - self_critical_after 30"),
    (SC_SCST, "trainer.max_steps", -1, "epochs, not steps"),
    (SC_SCST, "trainer.gradient_clip_val", 0.1, "opts.py grad_clip_value"),
    (SC_SCST, "trainer.gradient_clip_algorithm", "value", "opts.py grad_clip_mode"),
    (SC_SCST, M + "optimizer.name", "adam", "updown_nsc.yml optim"),
    (SC_SCST, M + "optimizer.lr", 0.00005, "updown_nsc.yml learning_rate"),
    (SC_SCST, M + "optimizer.schedule", "constant", "updown_nsc.yml: no decay"),
    (SC_SCST, M + "optimizer.weight_decay", 0.0, "opts.py weight_decay"),
    (SC_SCST, M + "num_samples", 5, "updown_nsc.yml train_sample_n"),
    (SC_SCST, M + "baseline", "mean_of_others", "losses.py: new SCST baseline"),
    (SC_SCST, M + "eos_as_word", True, "rewards.py / prepro_ngrams.py: <eos> is a word"),
    (SC_SCST, M + "cider_weight", 1.0, "opts.py cider_reward_weight"),
    (SC_SCST, M + "bleu_weight", 0.0, "opts.py bleu_reward_weight"),
    (SC_SCST, M + "net.dropout", 0.5, "opts.py drop_prob_lm"),
    (SC_SCST, M + "decoding.beam_size", 5, "MODEL_ZOO.md beam 5"),
    (SC_SCST, M + "decoding.block_repeated_words", False, "eval_utils decoding_constraint 0"),
    (SC_SCST, D + "batch_size", 10, "updown_nsc.yml batch_size"),
    # The Up-Down Caffe SCST stage (scst_solver.prototxt, scst_net.prototxt, scst_layers.py).
    (CAFFE_SCST, "trainer.max_steps", 1000, "scst_solver.prototxt max_iter"),
    (CAFFE_SCST, "trainer.gradient_clip_val", 10.0, "scst_solver.prototxt clip_gradients"),
    (CAFFE_SCST, "trainer.gradient_clip_algorithm", "norm", "Caffe clips by the global norm"),
    (CAFFE_SCST, M + "optimizer.name", "sgd", "scst_solver.prototxt SGD"),
    (CAFFE_SCST, M + "optimizer.lr", 0.001, "scst_solver.prototxt base_lr"),
    (CAFFE_SCST, M + "optimizer.momentum", 0.9, "scst_solver.prototxt momentum"),
    (CAFFE_SCST, M + "optimizer.weight_decay", 0.0005, "scst_solver.prototxt weight_decay"),
    (CAFFE_SCST, M + "optimizer.schedule", "exponential", "scst_solver.prototxt lr_policy exp"),
    (CAFFE_SCST, M + "optimizer.gamma", 0.99975, "scst_solver.prototxt gamma"),
    (CAFFE_SCST, M + "num_samples", 5, "scst_net.prototxt beam_size"),
    (CAFFE_SCST, M + "baseline", "beam_mean", "scst_layers.py: mean reward of the beams"),
    (CAFFE_SCST, M + "eos_as_word", False, "scst_layers.py: beams scored without the end token"),
    (CAFFE_SCST, M + "net.dropout", 0.0, "scst_net.prototxt: no dropout"),
    (CAFFE_SCST, M + "decoding.block_repeated_words", True, "decoder.prototxt allowed_multiple"),
    (CAFFE_SCST, M + "decoding.repeatable_words", list(CAFFE_REPEATABLE_WORDS), "decoder.prototxt"),
    (CAFFE_SCST, D + "batch_size", 96, "scst_net.prototxt: 12 images x iter_size 4 x 2 GPUs"),
    # hengyuan-hu/bottom-up-attention-vqa (main.py, train.py, base_model.py, fc.py, attention.py).
    ((*HH_VQA,), "seed_everything", 1111, "main.py --seed"),
    (HH_VQA, "trainer.max_epochs", 30, "main.py --epochs"),
    (HH_VQA, "trainer.gradient_clip_val", 0.25, "train.py clip_grad_norm 0.25"),
    (HH_VQA, "trainer.gradient_clip_algorithm", "norm", "train.py clip_grad_norm"),
    (HH_VQA, M + "net.hidden_size", 1024, "main.py --num_hid"),
    (HH_VQA, M + "net.embedding_size", 300, "GloVe 300-d"),
    (HH_VQA, M + "net.activation", "relu", "fc.py FCNet: Linear + ReLU"),
    (HH_VQA, M + "net.attention", "product", "attention.py NewAttention"),
    (HH_VQA, M + "net.fusion", "product", "base_model.py q_repr * v_repr"),
    (HH_VQA, M + "net.dropout", 0.2, "attention.py dropout"),
    (HH_VQA, M + "net.classifier_dropout", 0.5, "classifier.py dropout"),
    (HH_VQA, M + "net.weight_norm", True, "fc.py weight_norm"),
    (HH_VQA, M + "optimizer.name", "adamax", "train.py Adamax"),
    (HH_VQA, M + "optimizer.lr", 0.002, "torch Adamax default lr"),
    (HH_VQA, M + "optimizer.schedule", "constant", "train.py: no schedule"),
    (HH_VQA, D + "batch_size", 512, "main.py --batch_size"),
    (HH_VQA, D + "train_splits", ["train"], "main.py trains on train, scores val"),
    # Teney et al. 2018 / Anderson et al. 2018 (the paper's VQA model).
    (TENEY_VQA, M + "net.hidden_size", 512, "Teney et al.: 512"),
    (TENEY_VQA, M + "net.activation", "gated_tanh", "Teney et al.: gated tanh"),
    (TENEY_VQA, M + "net.attention", "concat", "Teney et al.: attention on [v_i; q]"),
    (TENEY_VQA, M + "optimizer.name", "adadelta", "Teney et al.: AdaDelta"),
    (TENEY_VQA, D + "batch_size", 512, "Teney et al.: 512"),
]
# BFAN (CrossmodalGroup/BFAN README COCO rows, train.py): the two variants differ in focal_type only.
for _bfan, _focal in ((BFAN_EQUAL, "equal"), (BFAN_PROB, "prob")):
    REFERENCE += [
        (_bfan, M + "net.focal_type", _focal, "README --focal_type"),
        (_bfan, M + "net.word_embedding_size", 300, "train.py --word_dim"),
        (_bfan, M + "net.joint_embedding_size", 1024, "README --embed_size"),
        (_bfan, M + "net.num_gru_layers", 1, "train.py --num_layers"),
        (_bfan, M + "net.lambda_softmax", 20.0, "README --lambda_softmax"),
        (_bfan, M + "margin", 0.2, "train.py --margin"),
        (_bfan, M + "max_violation", True, "README --max_violation"),
        (_bfan, M + "optimizer.name", "adam", "model.py torch.optim.Adam"),
        (_bfan, M + "optimizer.lr", 0.0005, "README --learning_rate (COCO)"),
        (_bfan, M + "optimizer.schedule", "step", "train.py adjust_learning_rate"),
        (_bfan, M + "optimizer.step_size", 15, "README --lr_update"),
        (_bfan, M + "optimizer.gamma", 0.1, "train.py adjust_learning_rate"),
        (_bfan, "trainer.gradient_clip_val", 2.0, "train.py --grad_clip"),
        (_bfan, "trainer.max_epochs", 20, "README --num_epochs (COCO)"),
        (_bfan, D + "batch_size", 128, "README --batch_size"),
        (_bfan, D + "captions_per_image", 5, "SCAN / BFAN files: 5 captions per image"),
    ]


def composed(configs: tuple[str, ...], capsys) -> dict:
    args = [a for config in configs for a in ("--config", str(ROOT / "configs" / config))]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def lookup(config: dict, dotted: str):
    value = config
    for key in dotted.split("."):
        value = value[key]
    return value


@pytest.mark.parametrize("configs", sorted({row[0] for row in REFERENCE}), ids=lambda c: " + ".join(c))
def test_recipes_equal_their_references(configs, capsys):
    config = composed(configs, capsys)
    drifted = [
        f"{setting}: config {lookup(config, setting)!r}, reference {expected!r} ({source})"
        for group, setting, expected, source in REFERENCE
        if group == configs and lookup(config, setting) != expected
    ]
    assert not drifted, "\n".join(drifted)


def test_every_recipe_config_is_in_the_reference_table():
    recipes = {
        str(path.relative_to(ROOT / "configs"))
        for path in (ROOT / "configs").rglob("*.yaml")
        if not path.name.startswith("synthetic")
    }
    assert recipes == {config for group, *_ in REFERENCE for config in group}


def test_scheduled_sampling_ramp_is_self_critical_pytorchs():
    """self-critical.pytorch (train.py): frac = (epoch - start) // every; ss_prob = min(increase * frac, max)."""
    from updown.tasks.captioning import ScheduledSampling

    ramp = ScheduledSampling(start_epoch=0, increase_every=5, increase_by=0.05, max_probability=0.25)
    for epoch in range(40):
        reference = min(0.05 * ((epoch - 0) // 5), 0.25)
        assert ramp.at_epoch(epoch) == pytest.approx(reference), epoch
    late = ScheduledSampling(start_epoch=3, increase_every=2, increase_by=0.1, max_probability=0.3)
    assert [late.at_epoch(e) for e in range(10)] == pytest.approx([0, 0, 0, 0, 0, 0.1, 0.1, 0.2, 0.2, 0.3])
    assert ScheduledSampling(probability=0.4, increase_by=0.0).at_epoch(7) == 0.4  # a constant probability


def test_exponential_schedule_is_caffes_exp_policy():
    """Caffe's "exp" policy: lr = base_lr * gamma ^ iteration."""
    from updown.tasks.optim import OptimizerConfig

    parameter = torch.nn.Parameter(torch.zeros(1))
    built = OptimizerConfig("sgd", 0.001, schedule="exponential", gamma=0.99975).build([parameter], 1000)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert built["lr_scheduler"]["interval"] == "step"
    for _ in range(400):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * 0.99975**400, rel=1e-9)


def test_linear_schedule_reaches_zero_at_total_steps():
    from updown.tasks.optim import OptimizerConfig

    parameter = torch.nn.Parameter(torch.zeros(1))
    built = OptimizerConfig("sgd", 0.01, schedule="linear", total_steps=60).build([parameter], 10**6)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(60):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.01 and rates[30] == pytest.approx(0.005) and optimizer.param_groups[0]["lr"] == 0.0


def test_repeated_word_constraint_lets_only_the_listed_words_repeat(tiny_world):
    """Caffe's decoder constraint: with it, no word outside repeatable_words appears twice in a caption."""
    from updown.data.datamodules import CaptioningDataModule
    from updown.decoding import BeamSearchConfig
    from updown.models.captioner import CaptionerConfig
    from updown.tasks.captioning import CaptioningTask

    datamodule = CaptioningDataModule(data_root=str(tiny_world.root.parent), synthetic=TINY_SPEC)
    datamodule.setup("validate")
    batch = datamodule.dataset("val").collate([datamodule.dataset("val")[i] for i in range(12)])
    net = CaptionerConfig(embedding_size=8, hidden_size=16, attention_size=8)

    def captions(decoding: BeamSearchConfig) -> tuple[list[list[str]], list[list[str]]]:
        """Beam-search captions, and all beam candidates (the Caffe SCST samples), of an untrained model."""
        torch.manual_seed(0)
        task = CaptioningTask(net=net, decoding=decoding)
        task.setup_model(datamodule.data_spec())
        vocabulary = task.vocabulary
        with torch.no_grad():  # an untrained model repeats words freely
            task.model.output.bias.copy_(torch.randn_like(task.model.output.bias) * 0.1)
            best = task.captions_of(task.decode(batch).tokens)
            state = task.model.init_state(batch["image_features"], batch["image_features_mask"])
            candidates = beam_candidates(
                task.model.step, state, beam_size=3, max_length=12, bos_index=vocabulary.bos_index,
                eos_index=vocabulary.eos_index, unk_index=vocabulary.unk_index, **task.repeated_word_constraint(),
            )  # fmt: skip
        return [c.split() for c in best], [c.split() for c in task.captions_of(candidates)]

    def repeats(captions: list[list[str]]) -> set[str]:
        return {word for words in captions for word in words if words.count(word) > 1}

    free = captions(BeamSearchConfig(beam_size=3, max_length=12))
    assert repeats(free[0]) - {"a", "the"} and repeats(free[1]) - {"a", "the"}  # the premise: repeats happen
    constrained = captions(
        BeamSearchConfig(
            beam_size=3, max_length=12, block_repeated_words=True, repeatable_words=("a", "the", "zz")
        )
    )
    assert repeats(constrained[0]) <= {"a", "the"} and repeats(constrained[1]) <= {"a", "the"}


def test_build_cider_df_defaults_to_the_training_images_where_scst_looks(tmp_path, tiny_world):
    import importlib.util

    from updown.data.caption_preparation import read_prepared_captions
    from updown.data.datamodules import CaptioningDataModule

    spec = importlib.util.spec_from_file_location("build_cider_df", ROOT / "tools" / "build_cider_df.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    captions = tmp_path / "captions.json"
    captions.write_text((tiny_world.captions_dir / "captions.json").read_text())
    for eos_as_word in (False, True):
        assert tool.main(["--captions", str(captions), *(["--eos-as-word"] if eos_as_word else [])]) == 0
        datamodule = CaptioningDataModule(
            features_h5path=str(tiny_world.features_h5path), captions_jsonpath=str(captions),
            vocabulary_path=str(tiny_world.captions_dir / "vocabulary.json"),
        )  # fmt: skip
        written = json.loads(datamodule.cider_df_path(eos_as_word).read_text())
        training = read_prepared_captions(str(captions), ["train", "restval"])
        assert written["eos_as_word"] is eos_as_word
        assert written["ref_len"] == pytest.approx(math.log(len(training)))


def test_glove_recipe_without_the_file_names_the_option_and_the_download(tmp_path, tiny_world, capsys):
    args = [
        "--config", str(ROOT / "configs" / "vqa" / "updown.yaml"),
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--model.init_args.glove_path", str(tmp_path / "glove.6B.300d.txt"),
        *synthetic_world_args(tiny_world.root.parent),
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.init_args.glove_path" in err and "glove.6B.zip" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_prepare_vqa_takes_the_answer_classes_of_train_and_val_by_default(tmp_path, tiny_world):
    import importlib.util

    from updown.data.vocabulary import AnswerVocabulary
    from updown.data.vqa_preparation import prepare_vqa

    splits = {
        s: (tiny_world.vqa_questions_jsonpath(s), tiny_world.vqa_annotations_jsonpath(s))
        for s in ("train", "val")
    }
    spec = importlib.util.spec_from_file_location("prepare_vqa", ROOT / "tools" / "prepare_vqa.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    arguments = [a for name, (q, a_) in splits.items() for a in ("--split", f"{name}={q},{a_}")]
    assert tool.main([*arguments, "--output", str(tmp_path / "tool"), "--min-answer-count", "2"]) == 0
    _, expected = prepare_vqa(splits, tmp_path / "both", answer_splits=("train", "val"), min_answer_count=2)
    _, train_only = prepare_vqa(splits, tmp_path / "train", answer_splits=("train",), min_answer_count=2)
    written = AnswerVocabulary.from_file(tmp_path / "tool" / "answer_vocabulary.json")
    assert written.answers == expected.answers
    assert written.answers != train_only.answers  # the premise: val changes the list
