"""Bad input, one table: every entry point turns a malformed input into one clear message.

Each case makes one bad input in ``tmp_path``, runs a real entry point (``updown.fit``, ``updown.evaluate``,
``updown.predict`` or a ``tools/`` script) in-process through its ``main(argv)``, and checks the contract of
docs/design.md, section 9: a non-zero exit code, exactly one ``error:`` line on stderr naming the file, the problem and the fix,
no traceback (unless ``--debug``), and no output file left behind. docs/troubleshooting.md is
built from this table; keep them in step.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_SPEC, synthetic_world_args, tiny_captioning_args

# Imported at collection, not inside a test: Lightning's log handlers must not bind to a test's captured stderr.
import updown.evaluate
import updown.fit
import updown.predict
import updown.validate
from updown.cli import USER_ERRORS

TOOLS = ("convert_features", "prepare_captions", "prepare_vqa", "make_synthetic", "build_cider_df")


@functools.cache
def entry_point(name: str) -> Callable[[list[str]], int]:
    """``main`` of ``updown.<name>`` or of ``tools/<name>.py``."""
    if name not in TOOLS:
        modules = {
            "fit": updown.fit,
            "validate": updown.validate,
            "evaluate": updown.evaluate,
            "predict": updown.predict,
        }
        return modules[name].main
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def vqa_fit_args(root: Path, data_root: Path, *extra: str) -> list[str]:
    """`updown.fit` arguments: the synthetic VQA config on the tiny world, a tiny model, one epoch."""
    return [
        "--config", str(ROOT / "configs" / "vqa" / "synthetic.yaml"),
        "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.net.embedding_size", "8",
        "--model.init_args.net.hidden_size", "16",
        "--data.init_args.batch_size", "64",
        *synthetic_world_args(data_root),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_vqa_checkpoint(tmp_path_factory, tiny_world) -> Path:
    """last.ckpt of a one-epoch VQA run on the tiny world."""
    root = tmp_path_factory.mktemp("vqa_run")
    assert entry_point("fit")(vqa_fit_args(root, tiny_world.root.parent)) == 0
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


class World:
    """The good inputs that cases start from, built on first use (a case pays only for what it needs)."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request

    @functools.cached_property
    def synthetic(self):
        return self._request.getfixturevalue("tiny_world")

    @property
    def data_root(self) -> Path:
        return self.synthetic.root.parent

    @property
    def features(self) -> Path:
        return self.synthetic.features_h5path

    @property
    def captions(self) -> Path:
        return self.synthetic.captions_dir / "captions.json"

    @property
    def vocabulary(self) -> Path:
        return self.synthetic.captions_dir / "vocabulary.json"

    def references(self, split: str) -> Path:
        return self.synthetic.captions_dir / f"references_{split}.json"

    @functools.cached_property
    def prepared_vqa(self) -> Path:
        from updown.data.vqa_data import VQADataModule

        datamodule = VQADataModule(data_root=str(self.data_root), synthetic=TINY_SPEC)
        datamodule.prepare_data()
        return Path(datamodule.prepared_dir)

    @functools.cached_property
    def caption_checkpoint(self) -> Path:
        return self._request.getfixturevalue("tiny_captioning_run") / "checkpoints" / "last.ckpt"

    @functools.cached_property
    def vqa_checkpoint(self) -> Path:
        return self._request.getfixturevalue("tiny_vqa_checkpoint")


# ----------------------------------------------------------------------------------------------------------
# Making bad inputs.


def features_copy(tmp: Path, world: World, mutate: Callable[[h5py.File], object] | None = None) -> Path:
    """A copy of the world's region features, changed in place by ``mutate``."""
    path = tmp / "features.h5"
    shutil.copy(world.features, path)
    if mutate is not None:
        with h5py.File(path, "r+") as f:
            mutate(f)
    return path


def rename_features(f: h5py.File) -> None:
    f.move("features", "feats")


def three_coordinate_boxes(f: h5py.File) -> None:
    boxes = f["boxes"][()]
    del f["boxes"]
    f.create_dataset("boxes", data=boxes[..., :3])


def nan_features(f: h5py.File) -> None:
    features = f["features"][()]
    features[:, 0, 0] = np.nan
    f["features"][...] = features


def duplicate_image_id(f: h5py.File) -> None:
    ids = f["image_id"][()]
    ids[1] = ids[0]
    f["image_id"][...] = ids


def edit_json(source: Path, destination: Path, edit: Callable[[object], object]) -> Path:
    data = json.loads(source.read_text())
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(json.dumps(edit(data)))
    return destination


def karpathy(tmp: Path, images: list[dict] | None = None) -> Path:
    """A small Karpathy-format ``dataset_coco.json``."""
    sentence = {"raw": "A dog on a red sofa.", "tokens": ["a", "dog", "on", "a", "red", "sofa"]}
    images = images or [
        {"cocoid": 1, "split": "train", "sentences": [sentence]},
        {"cocoid": 2, "split": "val", "sentences": [sentence]},
    ]
    path = tmp / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    return path


def prepared_vqa_copy(tmp: Path, world: World, edit_test_questions=None) -> Path:
    """A copy of the world's prepared VQA folder; ``edit_test_questions`` changes questions_test.json."""
    prepared = tmp / "prepared"
    shutil.copytree(world.prepared_vqa, prepared)
    if edit_test_questions is not None:
        path = prepared / "questions_test.json"
        edit_json(path, path, edit_test_questions)
    return prepared


def first_question_on_image(image_id: int):
    def edit(data):
        data["questions"][0]["image_id"] = image_id
        return data

    return edit


def caption_image_on(image_id: int, split: str):
    def edit(data):
        data["images"][0].update(image_id=image_id, split=split)
        return data

    return edit


def checkpoint_with(tmp: Path, source: Path, name: str, change: Callable[[dict], None]) -> Path:
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    change(checkpoint)
    path = tmp / name
    torch.save(checkpoint, path)
    return path


def another_vocabulary(checkpoint: dict) -> None:
    vocabularies = checkpoint["data_spec"]["vocabularies"]
    vocabularies["caption"] = [*vocabularies["caption"][:-1], "zebra"]


def another_answer_set(checkpoint: dict) -> None:
    vocabularies = checkpoint["data_spec"]["vocabularies"]
    vocabularies["answer"] = [
        vocabularies["answer"][1],
        vocabularies["answer"][0],
        *vocabularies["answer"][2:],
    ]


def predict_captions(tmp: Path, world: World, features=None, captions=None, vocabulary=None, checkpoint=None):
    return [
        "captions", "--checkpoint", str(checkpoint or world.caption_checkpoint),
        "--features", str(features or world.features), "--captions", str(captions or world.captions),
        "--vocabulary", str(vocabulary or world.vocabulary), "--output", str(tmp / "out.json"),
    ]  # fmt: skip


def predict_vqa(tmp: Path, world: World, features=None, prepared=None, checkpoint=None):
    return [
        "vqa", "--checkpoint", str(checkpoint or world.vqa_checkpoint), "--features", str(features or world.features),
        "--prepared", str(prepared or world.prepared_vqa), "--output", str(tmp / "out.json"),
    ]  # fmt: skip


def fit_captions(tmp: Path, world: World, features=None, captions=None, vocabulary=None, *extra: str):
    data = []
    if features or captions or vocabulary:
        data = [
            "--data.init_args.features_h5path", str(features or world.features),
            "--data.init_args.captions_jsonpath", str(captions or world.captions),
            "--data.init_args.vocabulary_path", str(vocabulary or world.vocabulary),
        ]  # fmt: skip
    return tiny_captioning_args(tmp / "out", world.data_root, *data, *extra)


def short_caption_results(tmp: Path, world: World) -> list[str]:
    """Caption results that leave out the first test image."""
    references = json.loads(world.references("test").read_text())
    results = [{"image_id": image["id"], "caption": "a dog"} for image in references["images"][1:]]
    (tmp / "results.json").write_text(json.dumps(results))
    return ["captions", "--references", str(world.references("test")), "--results", str(tmp / "results.json"),
            "--spice", "off", "--output", str(tmp / "out.json")]  # fmt: skip


def short_vqa_results(tmp: Path, world: World) -> list[str]:
    """VQA results that leave out the last test question."""
    questions = json.loads((world.prepared_vqa / "questions_test.json").read_text())["questions"]
    results = [{"question_id": q["question_id"], "answer": "yes"} for q in questions[:-1]]
    (tmp / "results.json").write_text(json.dumps(results))
    return ["vqa", "--questions", str(world.prepared_vqa / "questions_test.json"),
            "--annotations", str(world.prepared_vqa / "annotations_test.json"),
            "--results", str(tmp / "results.json"), "--output", str(tmp / "out.json")]  # fmt: skip


def raw_vqa(tmp: Path, world: World, split: str = "train", questions_edit=None) -> tuple[Path, Path]:
    raw = world.synthetic
    questions = tmp / f"questions_{split}.json"
    edit_json(raw.vqa_questions_jsonpath(split), questions, questions_edit or (lambda data: data))
    return questions, raw.vqa_annotations_jsonpath(split)


def image_in_two_split_lists(tmp: Path, world: World) -> list[str]:
    """COCO captions whose image 8 is listed in both the train and the val split lists."""
    annotations = [{"image_id": 7, "caption": "a dog"}, {"image_id": 8, "caption": "a cat"}]
    captions = write(tmp / "captions_train.json", json.dumps({"annotations": annotations}))
    train, val = write(tmp / "train_ids.txt", "7\n8\n"), write(tmp / "val_ids.txt", "8\n")
    return ["--coco", str(captions), "--split", f"train={train}", "--split", f"val={val}",
            "--output", str(tmp / "out"), "--min-count", "1"]  # fmt: skip


def repeat_first_question(data):
    data["questions"].append(dict(data["questions"][0]))
    return data


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def truncated(tmp: Path, world: World) -> Path:
    path = tmp / "truncated.h5"
    data = world.features.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def listed_twice(data):
    data["images"].append(dict(data["images"][0]))
    return data


def one_token_list_short(data):
    data["images"][0]["tokens"] = data["images"][0]["tokens"][1:]
    return data


def targets_without_answers(data):
    question = next(q for q in data["questions"] if q["answer_scores"])
    question["answers"] = []
    return data


def prepared_vqa_with(tmp: Path, world: World, name: str, edit) -> Path:
    """A copy of the world's prepared VQA folder with ``name`` changed by ``edit``."""
    prepared = prepared_vqa_copy(tmp, world)
    edit_json(prepared / name, prepared / name, edit)
    return prepared


def flipped_byte(tmp: Path, source: Path) -> Path:
    """``source`` with one bit flipped in the middle of its weights: torch.load reads it without complaint."""
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0x10
    path = tmp / "flipped.ckpt"
    path.write_bytes(bytes(data))
    return path


def truncated_checkpoint(tmp: Path, world: World) -> Path:
    path = tmp / "truncated.ckpt"
    data = world.caption_checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def validate_captions(tmp: Path, world: World, checkpoint: Path) -> list[str]:
    run = world.caption_checkpoint.parents[1]
    return ["--config", str(run / "config.yaml"), "--ckpt_path", str(checkpoint), "--output", str(tmp / "out.json"),
            "--trainer.enable_progress_bar", "false"]  # fmt: skip


def karpathy_float_id(tmp: Path, world: World) -> list[str]:
    images = [{"cocoid": 7.5, "split": "train", "sentences": [{"raw": "a dog", "tokens": ["a", "dog"]}]}]
    return ["--karpathy", str(karpathy(tmp, images)), "--output", str(tmp / "out"), "--min-count", "1"]


def numeric_answer(data):
    data["annotations"][0]["answers"][0]["answer"] = 2
    return data


def unwritable_reference_file(tmp: Path, world: World) -> list[str]:
    """A folder where prepare_captions writes references_val.json: the last output cannot be written."""
    (tmp / "out" / "references_val.json").mkdir(parents=True)
    return ["--karpathy", str(karpathy(tmp)), "--output", str(tmp / "out"), "--min-count", "1"]


def question_type_list(tmp: Path, world: World) -> list[str]:
    annotations = edit_json(
        world.prepared_vqa / "annotations_test.json", tmp / "annotations.json",
        lambda d: {**d, "annotations": [{**d["annotations"][0], "question_type": ["what"]}, *d["annotations"][1:]]},
    )  # fmt: skip
    questions = json.loads((world.prepared_vqa / "questions_test.json").read_text())["questions"]
    results = write(
        tmp / "results.json",
        json.dumps([{"question_id": q["question_id"], "answer": "yes"} for q in questions]),
    )
    return ["vqa", "--questions", str(world.prepared_vqa / "questions_test.json"), "--annotations", str(annotations),
            "--results", str(results), "--output", str(tmp / "out.json")]  # fmt: skip


def scoring_that_fails(tmp: Path, world: World) -> list[str]:
    """Prediction whose --score needs SPICE, whose jars are not installed: the scoring fails after decoding."""
    from updown.metrics.coco_caption import spice_available

    if spice_available():
        pytest.skip("the SPICE jars are installed here: scoring would succeed")
    return [*predict_captions(tmp, world), "--attention", str(tmp / "out.h5"), "--score", str(tmp / "scores.json"),
            "--spice", "on"]  # fmt: skip


def scst_from(tmp: Path, world: World, init_weights: Path) -> list[str]:
    return fit_captions(
        tmp, world, None, None, None, "--config", str(ROOT / "configs" / "captioning" / "synthetic_scst.yaml"),
        "--model.init_args.init_weights", str(init_weights),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The table.


@dataclass(frozen=True)
class Case:
    """One malformed input.

    Attributes:
        id: the test id.
        entry: ``fit``, ``evaluate``, ``predict`` or a tool's name.
        make: creates the bad input under ``tmp_path`` and returns the entry point's arguments.
        expect: fragments of the one error line: the file, the problem and the fix.
        absent: output (relative to ``tmp_path``) that must not exist afterwards.
        unchanged: an existing output (relative to ``tmp_path``) that must keep its content.
    """

    id: str
    entry: str
    make: Callable[[Path, World], list[str]]
    expect: tuple[str, ...]
    absent: str | None = "out.json"
    unchanged: str | None = None


CONVERT_HINT = "tools/convert_features.py"

CASES = [
    # --- region features (HDF5) ---
    Case(
        "features-missing", "fit",
        lambda tmp, w: fit_captions(tmp, w, features=tmp / "absent.h5"),
        ("absent.h5", "region-feature file not found", "Check the path", CONVERT_HINT), absent="out",
    ),
    Case(
        "features-truncated", "fit",
        lambda tmp, w: fit_captions(tmp, w, features=truncated(tmp, w)),
        ("truncated.h5", "not a readable HDF5 file", "regenerate it"), absent="out",
    ),
    Case(
        "features-not-hdf5", "predict",
        lambda tmp, w: predict_captions(tmp, w, features=write(tmp / "features.h5", "image_id\tfeatures\n1\t0.5\n")),
        ("features.h5", "not a readable HDF5 file", CONVERT_HINT),
    ),
    Case(
        "features-wrong-dataset-name", "predict",
        lambda tmp, w: predict_vqa(tmp, w, features=features_copy(tmp, w, rename_features)),
        ("features.h5", "missing dataset(s) ['features']", "feats", CONVERT_HINT),
    ),
    Case(
        "features-wrong-shape", "predict",
        lambda tmp, w: predict_captions(tmp, w, features=features_copy(tmp, w, three_coordinate_boxes)),
        ("features.h5", "dataset 'boxes' has shape", ", 4)", CONVERT_HINT),
    ),
    Case(
        "features-nan", "predict",
        lambda tmp, w: predict_captions(tmp, w, features=features_copy(tmp, w, nan_features)),
        ("features.h5", "contains NaN or inf for image", "re-extract"),
    ),
    Case(
        # A DataLoader worker re-raises the error with its traceback in the message; the user sees the message.
        "features-nan-in-a-worker", "predict",
        lambda tmp, w: [*predict_captions(tmp, w, features=features_copy(tmp, w, nan_features)), "--num-workers", "1"],
        ("features.h5", "contains NaN or inf for image", "re-extract"),
    ),
    Case(
        "features-nan-fit", "fit",
        lambda tmp, w: fit_captions(tmp, w, features=features_copy(tmp, w, nan_features)),
        ("features.h5", "contains NaN or inf for image", "re-extract"), absent="out",
    ),
    Case(
        "features-duplicate-image-id", "predict",
        lambda tmp, w: predict_vqa(tmp, w, features=features_copy(tmp, w, duplicate_image_id)),
        ("features.h5", "duplicate image ids", "each image must appear once"),
    ),
    # --- image ids ---
    Case(
        "captions-unknown-image", "fit",
        lambda tmp, w: fit_captions(
            tmp, w, captions=edit_json(w.captions, tmp / "captions.json", caption_image_on(999999, "train"))
        ),
        ("captions.json", "have no region features", "999999", "Use the feature file(s) of the same images"),
        absent="out",
    ),
    Case(
        "questions-unknown-image", "predict",
        lambda tmp, w: predict_vqa(tmp, w, prepared=prepared_vqa_copy(tmp, w, first_question_on_image(999999))),
        ("questions_test.json", "have no region features", "999999", "regenerate the annotations"),
    ),
    Case(
        "karpathy-duplicate-image", "prepare_captions",
        lambda tmp, w: ["--karpathy", str(karpathy(tmp, [
            {"cocoid": 7, "split": "train", "sentences": [{"raw": "a dog", "tokens": ["a", "dog"]}]},
            {"cocoid": 7, "split": "val", "sentences": [{"raw": "a cat", "tokens": ["a", "cat"]}]},
        ])), "--output", str(tmp / "out"), "--min-count", "1"],
        ("dataset_coco.json", "image 7", "more than once", "Keep one entry per image"), absent="out",
    ),
    Case(
        "split-list-duplicate-image", "prepare_captions",
        image_in_two_split_lists,
        ("val_ids.txt", "image 8", "train_ids.txt", "one split"), absent="out",
    ),
    Case(
        "vqa-repeated-question-id", "prepare_vqa",
        lambda tmp, w: ["--split", "train={},{}".format(*raw_vqa(tmp, w, "train", repeat_first_question)),
                        "--output", str(tmp / "out"), "--min-answer-count", "1"],
        ("questions_train.json", "repeated question ids", "official VQA v2 file"), absent="out",
    ),
    Case(
        "vqa-annotations-of-another-split", "prepare_vqa",
        lambda tmp, w: ["--split", f"train={raw_vqa(tmp, w, 'train')[0]},{w.synthetic.vqa_annotations_jsonpath('val')}",
                        "--output", str(tmp / "out"), "--min-answer-count", "1"],
        ("questions_train.json", "do not match", "same split"), absent="out",
    ),
    # --- JSON files ---
    Case(
        "references-empty", "evaluate",
        lambda tmp, w: ["captions", "--references", str(write(tmp / "references.json", "")),
                        "--results", str(write(tmp / "results.json", "[]")), "--output", str(tmp / "out.json")],
        ("references.json", "is empty", "Regenerate it or point to the right file"),
    ),
    Case(
        "karpathy-malformed", "prepare_captions",
        lambda tmp, w: ["--karpathy", str(write(tmp / "dataset_coco.json", '{"images": [')),
                        "--output", str(tmp / "out")],
        ("dataset_coco.json", "not valid JSON", "line 1", "Regenerate it"), absent="out",
    ),
    Case(
        "prepared-captions-not-an-object", "build_cider_df",
        lambda tmp, w: ["--captions", str(write(tmp / "captions.json", "[]")), "--split", "train",
                        "--output", str(tmp / "out.json")],
        ("captions.json", "expected an object with an 'images' list", "tools/prepare_captions.py"),
    ),
    Case(
        "vocabulary-malformed", "predict",
        lambda tmp, w: predict_captions(tmp, w, vocabulary=write(tmp / "vocabulary.json", '{"words": []}')),
        ("vocabulary.json", "expected a JSON object with a 'tokens' list", "tools/prepare_captions.py"),
    ),
    Case(
        "caption-results-not-a-list", "evaluate",
        lambda tmp, w: ["captions", "--references", str(w.references("test")),
                        "--results", str(write(tmp / "results.json", '{"image_id": 1}')), "--output", str(tmp / "out.json")],
        ("results.json", "expected a non-empty list", '"image_id": int'),
    ),
    # --- captions with no tokens ---
    Case(
        "karpathy-caption-without-words", "prepare_captions",
        lambda tmp, w: ["--karpathy", str(karpathy(tmp, [
            {"cocoid": 1, "split": "train", "sentences": [{"raw": "a dog", "tokens": ["a", "dog"]}]},
            {"cocoid": 2, "split": "train", "sentences": [{"raw": " ... ", "tokens": []}]},
        ])), "--output", str(tmp / "out"), "--min-count", "1"],
        ("dataset_coco.json", "image 2", "no words", "Remove or fix that caption"), absent="out",
    ),
    Case(
        "prepared-caption-without-tokens", "build_cider_df",
        lambda tmp, w: ["--captions", str(edit_json(w.captions, tmp / "captions.json", lambda d: {
            "images": [{**d["images"][0], "split": "train", "tokens": [[], *d["images"][0]["tokens"][1:]]}]})),
            "--split", "train", "--output", str(tmp / "out.json")],
        ("captions.json", "has a caption with no tokens", "prepare again"),
    ),
    Case(
        "vqa-question-without-words", "prepare_vqa",
        lambda tmp, w: ["--split", "train={},{}".format(*raw_vqa(tmp, w, "train", lambda d: {
            **d, "questions": [{**d["questions"][0], "question": "?"}, *d["questions"][1:]]})),
            "--output", str(tmp / "out"), "--min-answer-count", "1"],
        ("questions_train.json", "has no words", "Remove it or fix its text"), absent="out",
    ),
    # --- results that do not cover the split ---
    Case(
        "caption-results-miss-an-image", "evaluate", short_caption_results,
        ("results.json", "references_test.json", "no prediction", "Predict exactly the images of the references"),
    ),
    Case(
        "vqa-results-miss-a-question", "evaluate", short_vqa_results,
        ("results.json", "no result", "Give exactly one answer per question"),
    ),
    # --- checkpoints ---
    Case(
        "checkpoint-missing", "predict",
        lambda tmp, w: predict_captions(tmp, w, checkpoint=tmp / "absent.ckpt"),
        ("absent.ckpt", "checkpoint not found", "Check the path"),
    ),
    Case(
        "checkpoint-of-another-vocabulary", "predict",
        lambda tmp, w: predict_captions(
            tmp, w, checkpoint=checkpoint_with(tmp, w.caption_checkpoint, "other.ckpt", another_vocabulary)
        ),
        ("other.ckpt", "Vocabulary mismatch", "vocabulary.json", "'zebra'", "or retrain"),
    ),
    Case(
        "resume-from-checkpoint-of-another-vocabulary", "fit",
        lambda tmp, w: fit_captions(
            tmp, w, None, None, None,
            "--ckpt_path", str(checkpoint_with(tmp, w.caption_checkpoint, "other.ckpt", another_vocabulary)),
        ),
        ("the checkpoint", "other.ckpt", "Vocabulary mismatch", "vocabulary.json", "or retrain"), absent="out",
    ),
    Case(
        "checkpoint-of-another-answer-set", "predict",
        lambda tmp, w: predict_vqa(
            tmp, w, checkpoint=checkpoint_with(tmp, w.vqa_checkpoint, "other.ckpt", another_answer_set)
        ),
        ("other.ckpt", "Answer vocabulary mismatch", "first difference at class 0", "or retrain"),
    ),
    Case(
        "checkpoint-of-another-task", "predict",
        lambda tmp, w: predict_vqa(tmp, w, checkpoint=w.caption_checkpoint),
        ("last.ckpt", "not a VQA checkpoint", "configs/vqa"),
    ),
    # --- configs ---
    Case(
        "captioning-task-with-vqa-datamodule", "fit",
        lambda tmp, w: fit_captions(tmp, w, None, None, None, "--data.class_path", "updown.data.vqa_data.VQADataModule"),
        ("CaptioningTask needs a caption datamodule", "got VQADataModule", "data.class_path"), absent="out",
    ),
    Case(
        "vqa-task-with-caption-datamodule", "fit",
        lambda tmp, w: vqa_fit_args(tmp / "out", w.data_root, "--data.class_path",
                                    "updown.data.datamodules.CaptioningDataModule", "--data.init_args.batch_size", "20"),
        ("VQATask needs a VQA datamodule", "got CaptioningDataModule", "data.class_path"), absent="out",
    ),
    # --- outputs that exist ---
    Case(
        "predict-output-exists", "predict",
        lambda tmp, w: [*predict_captions(tmp, w), "--attention", str(write(tmp / "out.h5", "keep"))],
        ("out.h5", "output file exists", "--force"), absent="out.json", unchanged="out.h5",
    ),
    Case(
        "evaluate-output-exists", "evaluate",
        lambda tmp, w: ["captions", "--references", str(w.references("test")), "--human",
                        "--output", str(write(tmp / "out.json", "keep"))],
        ("out.json", "output file exists", "--force"), absent=None, unchanged="out.json",
    ),
    Case(
        "convert-output-exists", "convert_features",
        lambda tmp, w: ["--input", str(write(tmp / "features.tsv", "")), "--output", str(write(tmp / "out.h5", "keep"))],
        ("out.h5", "output file exists", "--force"), absent=None, unchanged="out.h5",
    ),
    Case(
        "cider-df-output-exists", "build_cider_df",
        lambda tmp, w: ["--captions", str(w.captions), "--split", "train", "--output", str(write(tmp / "out.json", "keep"))],
        ("out.json", "output file exists", "--force"), absent=None, unchanged="out.json",
    ),
    Case(
        "synthetic-output-exists", "make_synthetic",
        lambda tmp, w: ["--output", str(write(tmp / "out" / "notes.txt", "keep").parent), "--num-train", "4"],
        ("out", "folder exists and is not empty", "--force"), absent="out/features.h5", unchanged="out/notes.txt",
    ),
    Case(
        "prepare-vqa-output-exists", "prepare_vqa",
        lambda tmp, w: ["--split", "train={},{}".format(*raw_vqa(tmp, w, "train")), "--min-answer-count", "1",
                        "--output", str(write(tmp / "out" / "answer_vocabulary.json", "keep").parent)],
        ("answer_vocabulary.json", "output file(s) exist", "--force"), absent="out/questions_train.json",
        unchanged="out/answer_vocabulary.json",
    ),
    # --- prepared files checked at load (issue 16): each of these used to be accepted ---
    Case(
        # Training on it gave 13 captions' images for 12 images (the image twice).
        "prepared-captions-image-listed-twice", "fit",
        lambda tmp, w: fit_captions(tmp, w, captions=edit_json(w.captions, tmp / "captions.json", listed_twice)),
        ("captions.json", "is listed twice", "each image must appear once", "Prepare the captions again"), absent="out",
    ),
    Case(
        "prepared-captions-fewer-token-lists-than-captions", "build_cider_df",
        lambda tmp, w: ["--captions", str(edit_json(w.captions, tmp / "captions.json", one_token_list_short)),
                        "--split", "train", "--output", str(tmp / "out.json")],
        ("captions.json", "5 captions but 4 token lists", "Prepare the captions again"),
    ),
    Case(
        "val-split-typo", "fit",
        lambda tmp, w: fit_captions(tmp, w, None, None, None, "--data.init_args.val_split", "vall"),
        ("captions.json", "no split 'vall'", "the file has the splits train", "val (12 images)", "val_split"),
        absent="out",
    ),
    Case(
        "predict-split-typo", "predict",
        lambda tmp, w: [*predict_captions(tmp, w), "--split", "tset"],
        ("captions.json", "no split 'tset'", "test (12 images)", "Check the split name"),
    ),
    Case(
        "predict-vqa-split-typo", "predict",
        lambda tmp, w: [*predict_vqa(tmp, w), "--split", "tset"],
        ("prepared", "no prepared split 'tset'", "the folder has the splits test, train, val", "tools/prepare_vqa.py"),
    ),
    Case(
        "prepared-question-listed-twice", "predict",
        lambda tmp, w: predict_vqa(tmp, w, prepared=prepared_vqa_copy(tmp, w, repeat_first_question)),
        ("questions_test.json", "is listed twice", "each question must appear once"),
    ),
    Case(
        "prepared-soft-targets-without-answers", "predict",
        lambda tmp, w: predict_vqa(tmp, w, prepared=prepared_vqa_copy(tmp, w, targets_without_answers)),
        ("questions_test.json", "soft target(s) but no human answers", "tools/prepare_vqa.py"),
    ),
    Case(
        "answer-vocabulary-with-a-number", "predict",
        lambda tmp, w: predict_vqa(tmp, w, prepared=prepared_vqa_with(
            tmp, w, "answer_vocabulary.json", lambda d: {"answers": [*d["answers"], 7]})),
        ("answer_vocabulary.json", "every answer must be a string", "tools/prepare_vqa.py"),
    ),
    Case(
        "karpathy-float-image-id", "prepare_captions", karpathy_float_id,
        ("dataset_coco.json", "images[0]", "cocoid 7.5 is not an integer"), absent="out",
    ),
    Case(
        "vqa-numeric-human-answer", "prepare_vqa",
        lambda tmp, w: ["--split", "train={},{}".format(
            raw_vqa(tmp, w)[0], edit_json(w.synthetic.vqa_annotations_jsonpath("train"), tmp / "annotations.json", numeric_answer)),
            "--output", str(tmp / "out"), "--min-answer-count", "1"],
        ("annotations.json", "annotations[0]", "'answers' (a list of {'answer': str})"), absent="out",
    ),
    Case(
        # A traceback (unhashable type) before.
        "vqa-annotation-question-type-list", "evaluate", question_type_list,
        ("annotations: question", "a string 'question_type'", "official VQA annotations"),
    ),
    # --- option ranges, checked at parse time and naming the option (issue 16) ---
    Case(
        "beam-size-zero", "fit",
        lambda tmp, w: fit_captions(tmp, w, None, None, None, "--model.init_args.decoding.beam_size", "0"),
        ("--model.init_args.decoding.beam_size", "must be an integer > 0", "got 0"), absent="out",
    ),
    Case(
        "dropout-one-in-a-config", "fit",
        lambda tmp, w: fit_captions(tmp, w, None, None, None, "--config", str(write(
            tmp / "dropout.yaml", "model:\n  init_args:\n    net:\n      dropout: 1.0\n"))),
        ("model.init_args.net.dropout (from --config)", "must be a number >= 0 and < 1", "got 1.0"), absent="out",
    ),
    Case(
        "negative-synthetic-noise", "fit",
        lambda tmp, w: fit_captions(tmp, w, None, None, None, "--data.init_args.synthetic.noise", "-0.5"),
        ("--data.init_args.synthetic.noise", "must be a number >= 0", "got -0.5"), absent="out",
    ),
    Case(
        # A ZeroDivisionError traceback after the first epoch before.
        "trainer-accumulate-zero-batches", "fit",
        lambda tmp, w: fit_captions(tmp, w, None, None, None, "--trainer.accumulate_grad_batches", "0"),
        ("--trainer.accumulate_grad_batches=0", "must be an integer > 0"), absent="out",
    ),
    Case(
        "predict-batch-size-zero", "predict",
        lambda tmp, w: [*predict_captions(tmp, w), "--batch-size", "0"],
        ("--batch-size", "must be an integer > 0", "'0'"),
    ),
    Case(
        "prepare-captions-min-count-zero", "prepare_captions",
        lambda tmp, w: ["--karpathy", str(karpathy(tmp)), "--output", str(tmp / "out"), "--min-count", "0"],
        ("--min-count", "must be an integer > 0"), absent="out",
    ),
    Case(
        "cider-n-zero", "build_cider_df",
        lambda tmp, w: ["--captions", str(w.captions), "--n", "0", "--output", str(tmp / "out.json")],
        ("--n", "must be an integer > 0"),
    ),
    Case(
        # A numpy traceback before.
        "synthetic-min-boxes-above-max", "make_synthetic",
        lambda tmp, w: ["--output", str(tmp / "out"), "--min-boxes", "20", "--max-boxes", "10"],
        ("min_boxes=20 is above max_boxes=10", "raise max_boxes"), absent="out",
    ),
    # --- devices that are not there ---
    Case(
        "predict-device-not-present", "predict",
        lambda tmp, w: [*predict_captions(tmp, w), "--device", "cuda:99"],
        ("--device cuda:99", "This machine has: cpu", "--device cpu"),
    ),
    Case(
        "fit-accelerator-not-present", "fit",
        lambda tmp, w: fit_captions(tmp, w, None, None, None, "--trainer.accelerator", "gpu", "--trainer.devices", "99"),
        ("--trainer.accelerator gpu", "This machine has: cpu", "--trainer.accelerator cpu"), absent="out",
    ),
    # --- checkpoints that cannot be read, in every entry point (a traceback before, but in predict) ---
    Case(
        "resume-from-truncated-checkpoint", "fit",
        lambda tmp, w: fit_captions(tmp, w, None, None, None, "--ckpt_path", str(truncated_checkpoint(tmp, w))),
        ("--ckpt_path", "truncated.ckpt", "not a readable PyTorch checkpoint", "truncated"), absent="out",
    ),
    Case(
        "validate-truncated-checkpoint", "validate",
        lambda tmp, w: validate_captions(tmp, w, truncated_checkpoint(tmp, w)),
        ("--ckpt_path", "truncated.ckpt", "not a readable PyTorch checkpoint"),
    ),
    Case(
        "validate-checkpoint-not-a-checkpoint", "validate",
        lambda tmp, w: validate_captions(tmp, w, write(tmp / "notes.ckpt", "not a checkpoint")),
        ("--ckpt_path", "notes.ckpt", "not a readable PyTorch checkpoint"),
    ),
    Case(
        # torch.load reads it; the prediction would have come from other weights.
        "predict-checkpoint-with-a-flipped-byte", "predict",
        lambda tmp, w: predict_captions(tmp, w, checkpoint=flipped_byte(tmp, w.caption_checkpoint)),
        ("--checkpoint", "flipped.ckpt", "checksum mismatch", "corrupted"),
    ),
    Case(
        "scst-init-weights-truncated", "fit",
        lambda tmp, w: scst_from(tmp, w, truncated_checkpoint(tmp, w)),
        ("model.init_args.init_weights", "truncated.ckpt", "not a readable PyTorch checkpoint"), absent="out",
    ),
    Case(
        "scst-init-weights-of-another-task", "fit",
        lambda tmp, w: scst_from(tmp, w, w.vqa_checkpoint),
        ("model.init_args.init_weights", "not a captioning checkpoint", "captioning (XE) run"), absent="out",
    ),
    # --- all or nothing ---
    Case(
        # captions.json and vocabulary.json were left behind before.
        "prepare-captions-last-output-unwritable", "prepare_captions", unwritable_reference_file,
        ("references_val.json", "is a folder"), absent="out/captions.json",
    ),
    Case(
        # The results and attention files were written before the scoring failed (with a traceback).
        "predict-scoring-fails-writes-nothing", "predict", scoring_that_fails,
        ("--score", "SPICE was requested", "--spice auto"), absent="out.h5",
    ),
]  # fmt: skip


def run_case(case: Case, tmp_path: Path, world: World, *extra: str) -> int:
    argv = case.make(tmp_path, world)
    try:
        return entry_point(case.entry)([*argv, *extra])
    except SystemExit as exit_request:  # argparse refusing an option (a range): its one `error:` line
        return exit_request.code


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_one_clear_error_and_no_output(case: Case, tmp_path, request, capsys):
    world = World(request)
    kept = (tmp_path / case.unchanged) if case.unchanged else None
    code = run_case(case, tmp_path, world)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " error: " in line]
    assert code != 0, err
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    for fragment in case.expect:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    if case.absent is not None:
        assert not (tmp_path / case.absent).exists(), f"{case.absent} was left behind"
    if kept is not None:
        assert kept.read_text() == "keep", f"{case.unchanged} was overwritten"
    # No temporary file of an atomic write survives either.
    assert not [p for p in tmp_path.rglob(".*.tmp")], list(tmp_path.rglob(".*.tmp"))


DEBUG_CASES = ["features-missing", "references-empty", "predict-output-exists", "karpathy-malformed"]


@pytest.mark.parametrize("case", [c for c in CASES if c.id in DEBUG_CASES], ids=lambda case: case.id)
def test_debug_shows_the_exception(case: Case, tmp_path, request):
    with pytest.raises(USER_ERRORS):
        run_case(case, tmp_path, World(request), "--debug")


def test_exit_status_and_traceback_of_a_real_process(tmp_path):
    """The in-process table relies on `main`'s return value becoming the exit status; check it for real."""
    references = write(tmp_path / "references.json", "")
    command = [
        sys.executable,
        "-m",
        "updown.evaluate",
        "captions",
        "--references",
        str(references),
        "--human",
    ]
    quiet = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines() == [
        f"python -m updown.evaluate: error: {references}: COCO caption ground-truth JSON is empty. "
        "Regenerate it or point to the right file."
    ]
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, cwd=ROOT)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "ValueError" in debug.stderr
