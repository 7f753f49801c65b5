"""VQATask end to end on a tiny synthetic world: metrics.json, checkpoint vocabularies, the official accuracy
recomputed from written-out predictions, refusal of another answer vocabulary, and an isolated baseline."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_SPEC, synthetic_world_args

from updown.data.vocabulary import AnswerVocabulary, Vocabulary
from updown.data.vqa_data import VQADataModule
from updown.fit import main
from updown.io import read_json
from updown.losses import soft_score_bce
from updown.metrics.vqa_accuracy import evaluate_vqa
from updown.models.vqa import VQAConfig
from updown.tasks.vqa import VQATask

CONFIG = ROOT / "configs" / "vqa" / "synthetic.yaml"
BATCH_SIZE = 64
ANSWER_TYPES = {"yes/no": "yes_no", "number": "number", "other": "other"}


def tiny_args(root: Path, data_root: Path, *extra: str) -> list[str]:
    spec = TINY_SPEC
    return [
        "--config", str(CONFIG),
        "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.net.embedding_size", "8",
        "--model.init_args.net.hidden_size", "16",
        "--data.init_args.batch_size", str(BATCH_SIZE),
        *synthetic_world_args(data_root, spec),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def datamodule(tiny_world) -> VQADataModule:
    module = VQADataModule(data_root=str(tiny_world.root.parent), synthetic=TINY_SPEC, eval_batch_size=16)
    module.setup("fit")
    return module


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory, tiny_world) -> Path:
    """One 2-epoch fit of the synthetic VQA config (question-only baseline on); returns its run directory."""
    root = tmp_path_factory.mktemp("vqa_run")
    assert main(tiny_args(root, tiny_world.root.parent)) == 0
    return root / "lightning_logs" / "version_0"


def test_fit_writes_accuracies_and_checkpoint_vocabularies(fitted_run, datamodule):
    metrics = json.loads((fitted_run / "metrics.json").read_text())
    keys = ["val/vqa_accuracy", "val/question_only_accuracy", "best/val/vqa_accuracy"]
    keys += [
        f"val/{p}_{t}" for p in ("vqa_accuracy", "question_only_accuracy") for t in ANSWER_TYPES.values()
    ]
    for key in keys:
        assert key in metrics and isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 100.0, key
    num_train = len(datamodule.train_dataset())
    assert metrics["global_step"] == 2 * math.ceil(num_train / BATCH_SIZE)

    checkpoint = torch.load(fitted_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    prepared = Path(datamodule.prepared_dir)
    spec = checkpoint["data_spec"]
    assert (
        spec["vocabularies"]["question"] == Vocabulary.from_file(prepared / "question_vocabulary.json").tokens
    )
    assert (
        spec["vocabularies"]["answer"]
        == AnswerVocabulary.from_file(prepared / "answer_vocabulary.json").answers
    )
    assert spec["image_feature_size"] == TINY_SPEC.feature_size
    assert any(key.startswith("question_only_model.") for key in checkpoint["state_dict"])


def test_logged_accuracy_equals_official_evaluation_of_written_predictions(fitted_run, datamodule, tmp_path):
    """The last validation ran on last.ckpt's weights: re-answer val, write the official results JSON, score it."""
    metrics = json.loads((fitted_run / "metrics.json").read_text())
    task = VQATask.load_from_checkpoint(fitted_run / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    results, baseline_results = [], []
    with torch.no_grad():
        for index, batch in enumerate(datamodule.val_dataloader()):
            prediction = task.predict_step(batch, index)
            results += [
                {"question_id": q, "answer": a}
                for q, a in zip(prediction["question_id"], prediction["answer"])
            ]
            answers = task.answer(batch, question_only=True)
            baseline_results += [
                {"question_id": q, "answer": a} for q, a in zip(batch["question_id"].tolist(), answers)
            ]
    results_path = tmp_path / "vqa_val_results.json"
    results_path.write_text(json.dumps(results))

    questions = read_json(datamodule.questions_jsonpath("val"), "questions")
    annotations = read_json(datamodule.annotations_jsonpath("val"), "annotations")
    official = evaluate_vqa(questions, annotations, json.loads(results_path.read_text()))
    baseline = evaluate_vqa(questions, annotations, baseline_results)
    # evaluate_vqa rounds to 2 decimals, as the official code prints.
    assert metrics["val/vqa_accuracy"] == pytest.approx(official["overall"], abs=0.005 + 1e-9)
    assert metrics["val/question_only_accuracy"] == pytest.approx(baseline["overall"], abs=0.005 + 1e-9)
    assert set(official["perAnswerType"]) == set(ANSWER_TYPES)
    for answer_type, suffix in ANSWER_TYPES.items():
        assert metrics[f"val/vqa_accuracy_{suffix}"] == pytest.approx(
            official["perAnswerType"][answer_type], abs=0.005 + 1e-9
        )
        assert metrics[f"val/question_only_accuracy_{suffix}"] == pytest.approx(
            baseline["perAnswerType"][answer_type], abs=0.005 + 1e-9
        )


def test_checkpoint_with_another_answer_vocabulary_is_refused(fitted_run, datamodule, tmp_path, capsys):
    checkpoint = torch.load(fitted_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    answers = checkpoint["data_spec"]["vocabularies"]["answer"]
    checkpoint["data_spec"]["vocabularies"]["answer"] = [answers[1], answers[0], *answers[2:]]
    other = tmp_path / "other_answers.ckpt"
    torch.save(checkpoint, other)

    # Resuming training on the data's vocabulary.
    code = main(tiny_args(tmp_path / "resume", Path(datamodule.data_root), "--ckpt_path", str(other)))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "Answer vocabulary mismatch: the checkpoint" in err and "the data" in err
    assert f"first difference at class 0: {answers[1]!r} vs {answers[0]!r}" in err

    # A task restored from that checkpoint, put on the data (what configure_model does before validate/test).
    task = VQATask.load_from_checkpoint(other, map_location="cpu")
    with pytest.raises(
        ValueError, match="Answer vocabulary mismatch: the checkpoint has .* answer classes, the data"
    ):
        task.data_spec.check_matches(datamodule.data_spec())


def test_question_only_baseline_leaves_the_model_gradients_alone(datamodule):
    torch.manual_seed(0)
    task = VQATask(net=VQAConfig(embedding_size=8, hidden_size=16), question_only_baseline=True)
    task.setup_model(datamodule.data_spec())
    task.eval()  # no dropout, so the reference below sees the same function
    batch = next(iter(datamodule.train_dataloader()))
    reference = copy.deepcopy(task.model)
    reference_baseline = copy.deepcopy(task.question_only_model)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = task.training_step(batch, 0)
    loss.backward()
    joint_norm = torch.nn.utils.get_total_norm([p.grad for p in task.parameters() if p.grad is not None])
    clip = 0.01
    task.configure_gradient_clipping(None, clip, "norm")

    # Reference: each model alone, its own loss, clipped on its own norm.
    for model, expected in ((reference, task.model), (reference_baseline, task.question_only_model)):
        inputs = (batch["image_features"], batch["image_features_mask"], batch["question_tokens"])
        soft_score_bce(model(*inputs, batch["question_lengths"])["logits"], batch["answer_scores"]).backward()
        own_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        # Clipping is active, and one norm over both models would have scaled differently.
        assert own_norm > clip and joint_norm > own_norm * 1.01
        for (name, p), q in zip(expected.named_parameters(), model.parameters()):
            assert p.grad is not None and q.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_predict_vqa_writes_official_results_and_attention(fitted_run, tmp_path):
    """`python -m updown.predict vqa`: results JSON scored by the official-format evaluation, attention HDF5."""
    import h5py
    import numpy as np

    from updown.evaluate import main as evaluate_main
    from updown.predict import main as predict_main

    checkpoint = fitted_run / "checkpoints" / "last.ckpt"
    output, attention, scores = tmp_path / "results.json", tmp_path / "attention.h5", tmp_path / "scores.json"
    assert (
        predict_main(
            [
                "vqa",
                "--checkpoint",
                str(checkpoint),
                "--split",
                "val",
                "--output",
                str(output),
                "--attention",
                str(attention),
                "--score",
                str(scores),
            ]
        )
        == 0
    )
    results = json.loads(output.read_text())
    assert all(set(r) == {"question_id", "answer"} for r in results)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    from updown.data.base import datamodule_from_checkpoint

    data = datamodule_from_checkpoint(VQADataModule, saved)
    assert (
        evaluate_main(
            [
                "vqa",
                "--questions",
                str(data.questions_jsonpath("val")),
                "--annotations",
                str(data.annotations_jsonpath("val")),
                "--results",
                str(output),
                "--output",
                str(tmp_path / "official.json"),
            ]
        )
        == 0
    )
    assert json.loads(scores.read_text()) == json.loads((tmp_path / "official.json").read_text())
    # The answers of the model itself, in the split's order, one per question.
    task = VQATask.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    data.setup("validate")
    with torch.no_grad():
        direct = [
            {"question_id": q, "answer": a}
            for batch in data.val_dataloader()
            for q, a in zip(batch["question_id"].tolist(), task.answer(batch))
        ]
    assert results == direct
    with h5py.File(attention) as f:
        weights, num_boxes = f["attention"][()], f["num_boxes"][()]
        assert len(weights) == len(results)
        assert f["question_id"][()].tolist() == [r["question_id"] for r in results]
        assert [a.decode() if isinstance(a, bytes) else a for a in f["answers"][()]] == [r["answer"] for r in results]
        for row in range(len(weights)):
            np.testing.assert_allclose(weights[row, : num_boxes[row]].sum(), 1.0, atol=1e-5)
            assert np.all(weights[row, num_boxes[row] :] == 0)
