"""Fuzzing the inputs every entry point reads (docs/design.md, section 9), everything but the feature files.

Hypothesis mutates a good input (Karpathy and COCO caption JSON, VQA question and annotation JSON, prepared
caption files and vocabularies, results files, checkpoints, YAML configs, numeric command-line options) and
drives it through the entry point that reads it, in-process through ``main(argv)``: ``tools/prepare_captions.py``,
``tools/prepare_vqa.py``, ``tools/build_cider_df.py``, ``python -m updown.evaluate``, ``python -m updown.predict``
(on the tiny checkpoint of ``tests/conftest.py``) and ``python -m updown.fit --print_config``. Every run must
end in one of two ways:

- exit 0 with the result of the clean input (a mutation that does not matter, e.g. an unknown JSON key), or
- exit 2 with exactly one ``error:`` line on stderr and no traceback, leaving the outputs as they were.

Never a traceback, and never a different result with exit 0. The mutations are the ones that make an input
invalid or leave its meaning alone: truncated text, a value of another JSON type, a deleted key, a repeated
record, an unknown key, flipped bytes, out-of-range numbers. (Valid edits, such as another caption, may
rightly change the result and are not generated.)

Each property runs twice: a bounded, derandomised number of examples in the fast suite, and thousands
under ``pytest -m slow``. ``pytest -s`` prints how many examples each ran and how many were refused.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import io
import json
import tempfile
import typing
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import ROOT, synthetic_world_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Imported at collection, not inside a test: Lightning's log handlers must not bind to a test's captured stderr.
import updown.evaluate
import updown.fit
import updown.predict
from updown.config import literal_choices, restricted_number

pytestmark = pytest.mark.filterwarnings("ignore")

# Outcomes per property, printed by `pytest -s`.
OUTCOMES: Counter = Counter()


def fuzz(budget: int, check: Callable[[st.DataObject], str], name: str) -> None:
    """Run ``check`` on ``budget`` Hypothesis examples; ``check`` returns "same" or "refused"."""

    @settings(
        max_examples=budget,
        deadline=None,
        derandomize=budget <= 50,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def run(data: st.DataObject) -> None:
        OUTCOMES[(name, check(data))] += 1

    run()
    print(f"\n{name}: {OUTCOMES[(name, 'same')]} same result, {OUTCOMES[(name, 'refused')]} refused")


def budgets(fast: int, slow: int):
    """Parametrise a test with its examples in the fast suite (derandomised: CI sees the same inputs every run)
    and under `pytest -m slow` (random, thousands)."""
    return pytest.mark.parametrize(
        "budget", [pytest.param(fast, id="fast"), pytest.param(slow, id="slow", marks=pytest.mark.slow)]
    )


# ----------------------------------------------------------------------------------------------------------
# Running an entry point and checking the contract.


@functools.cache
def tool(name: str) -> Callable[[list[str]], int]:
    """``main`` of ``tools/<name>.py``."""
    spec = importlib.util.spec_from_file_location(f"_fuzz_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def invoke(main: Callable[[list[str]], int | None], argv: list[str]) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``main(argv)`` (an argparse error's SystemExit included)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv) or 0
        except SystemExit as exit_request:
            code = exit_request.code if isinstance(exit_request.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden temporary files included) and its bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def check_contract(
    main: Callable[[list[str]], int | None],
    argv: list[str],
    outputs: Path,
    result: Callable[[str], Any],
    clean: Any,
    option: str | None = None,
) -> str:
    """Run ``main(argv)``; either it succeeded with the clean result, or it gave one error and changed nothing.

    Args:
        outputs: the folder the run may write into (compared before and after a refusal).
        result: the run's result from its stdout (e.g. the files it wrote).
        clean: the clean input's result.
        option: when given, a refusal must name it.

    Returns:
        "same" or "refused".
    """
    before = files_under(outputs)
    code, out, err = invoke(main, argv)
    assert "Traceback" not in err, err
    if code == 0:
        assert result(out) == clean, f"exit 0 with a different result for {argv}\n{err}"
        return "same"
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1, f"exit {code}, errors {errors}:\n{err}"
    assert files_under(outputs) == before, f"a refused run changed {outputs}"
    if option is not None:
        assert option in errors[0], f"{option!r} not in {errors[0]!r}"
    return "refused"


# ----------------------------------------------------------------------------------------------------------
# Mutating JSON.

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(["", "x", "train", "1"]), st.just([]), st.just({}), st.just([1, "a"]), st.just({"k": 1}),
)  # fmt: skip


def json_type(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value)
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def containers(node: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every dict and list in ``node``, outermost first."""
    found = [path] if isinstance(node, (dict, list)) else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        found += containers(child, (*path, key))
    return found


def at(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


def draw_path(data: st.DataObject, document: Any) -> tuple:
    """A container of ``document``: shallow ones as likely as deep ones (a walk that may stop at every level)."""
    path: tuple = ()
    node = document
    while True:
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        children = [(key, child) for key, child in children if isinstance(child, (dict, list))]
        if not children or data.draw(st.booleans(), label="stop"):
            return path
        key, node = children[data.draw(st.integers(0, len(children) - 1), label="child")]
        path = (*path, key)


def mutate_json(
    data: st.DataObject, document: Any, entity_lists: tuple[tuple, ...], keep: frozenset[str] = frozenset()
) -> tuple[str, Any]:
    """A mutation of ``document`` that makes it invalid or leaves its meaning alone; returns (kind, new document).

    Kinds: ``retype`` (a value of another JSON type), ``delete`` (a key), ``repeat`` (a record of an
    ``entity_lists`` list twice), ``unknown`` (a key nothing reads). Keys in ``keep`` are neither retyped nor
    deleted: their absence (or null) has a documented fallback that may rightly change the result.
    """
    document = copy.deepcopy(document)
    lists = [p for p in entity_lists if at(document, p)]
    kinds = ["retype", "delete", "unknown"] + (["repeat"] if lists else [])
    kind = data.draw(st.sampled_from(kinds), label="mutation")
    if kind == "repeat":
        path = data.draw(st.sampled_from(lists), label="list")
        records = at(document, path)
        records.append(copy.deepcopy(records[data.draw(st.integers(0, len(records) - 1), label="record")]))
        return kind, document
    path = draw_path(data, document)
    node = at(document, path)
    if kind == "unknown" or not node:
        if isinstance(node, dict):
            node[data.draw(st.sampled_from(["zz_unknown", "notes", "_comment"]), label="key")] = 1
            return "unknown", document
        kind = "retype"
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    if kind == "delete" and isinstance(node, dict):
        keys = [k for k in keys if k not in keep]
        if keys:
            del node[data.draw(st.sampled_from(keys), label="key")]
            return kind, document
    keys = [k for k in keys if k not in keep]
    if not keys:
        return "unchanged", document
    key = data.draw(st.sampled_from(keys), label="key")
    old = node[key]
    node[key] = data.draw(JSON_VALUES.filter(lambda v: json_type(v) != json_type(old)), label="value")
    return "retype", document


def mutate_text(data: st.DataObject, text: str) -> str:
    """``text`` cut short: never valid JSON."""
    return text[: data.draw(st.integers(0, len(text) - 1), label="cut")]


def write_json(path: Path, document: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def json_input(data: st.DataObject, path: Path, document: Any, entity_lists, keep=frozenset()) -> None:
    """Write a mutated ``document`` (or its text cut short) to ``path``."""
    if data.draw(st.integers(0, 9), label="truncate") == 0:
        path.write_text(mutate_text(data, json.dumps(document)))
    else:
        write_json(path, mutate_json(data, document, entity_lists, keep)[1])


@contextlib.contextmanager
def scratch() -> typing.Iterator[Path]:
    """A fresh folder per example (Hypothesis runs many examples in one test)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        yield Path(folder)


# ----------------------------------------------------------------------------------------------------------
# Raw caption and VQA files -> the preparation tools.


@pytest.fixture(scope="module")
def karpathy(tiny_world) -> dict:
    """The tiny world's Karpathy file, cut to 16 images (4 per split, 5 captions each)."""
    data = json.loads(tiny_world.dataset_coco_jsonpath.read_text())
    images = []
    for split in ("train", "val", "test"):
        images += [image for image in data["images"] if image["split"] == split][
            : 8 if split == "train" else 4
        ]
    return {**data, "images": images}


@budgets(60, 3000)
def test_karpathy_json_through_prepare_captions(budget, karpathy):
    main = tool("prepare_captions")
    with scratch() as folder:
        source = write_json(folder / "dataset_coco.json", karpathy)
        assert (
            invoke(main, ["--karpathy", str(source), "--output", str(folder / "clean"), "--min-count", "1"])[
                0
            ]
            == 0
        )
        clean = files_under(folder / "clean")

    def check(data):
        with scratch() as folder:
            json_input(data, folder / "dataset_coco.json", karpathy, entity_lists=(("images",),))
            output = folder / "out"
            argv = [
                "--karpathy",
                str(folder / "dataset_coco.json"),
                "--output",
                str(output),
                "--min-count",
                "1",
            ]
            return check_contract(main, argv, folder, lambda _: files_under(output), clean)

    # The folder the run may write into is all of `folder`: a refusal must leave it with the input only.
    fuzz(budget, check, "karpathy -> prepare_captions")


@pytest.fixture(scope="module")
def coco_captions(karpathy) -> tuple[dict, dict[str, list[int]]]:
    """COCO-format caption annotations of the Karpathy images, and their split lists."""
    annotations = [
        {"image_id": image["cocoid"], "id": 10 * image["cocoid"] + k, "caption": sentence["raw"]}
        for image in karpathy["images"]
        for k, sentence in enumerate(image["sentences"])
    ]
    images = [{"id": image["cocoid"], "file_name": image["filename"]} for image in karpathy["images"]]
    lists: dict[str, list[int]] = {}
    for image in karpathy["images"]:
        lists.setdefault(image["split"], []).append(image["cocoid"])
    return {"info": {}, "images": images, "annotations": annotations}, lists


@budgets(40, 2000)
def test_coco_caption_json_through_prepare_captions(budget, coco_captions):
    main = tool("prepare_captions")
    document, lists = coco_captions

    def argv_for(folder: Path) -> list[str]:
        splits = []
        for split, ids in lists.items():
            path = folder / f"{split}_ids.txt"
            path.write_text("".join(f"{i}\n" for i in ids))
            splits += ["--split", f"{split}={path}"]
        return [
            "--coco",
            str(folder / "captions.json"),
            *splits,
            "--min-count",
            "1",
            "--output",
            str(folder / "out"),
        ]

    with scratch() as folder:
        write_json(folder / "captions.json", document)
        assert invoke(main, argv_for(folder))[0] == 0
        clean = files_under(folder / "out")

    def check(data):
        with scratch() as folder:
            argv = argv_for(folder)
            # The images list is not read (splits come from the lists): repeating an entry changes nothing.
            json_input(data, folder / "captions.json", document, entity_lists=(("images",),))
            return check_contract(main, argv, folder, lambda _: files_under(folder / "out"), clean)

    fuzz(budget, check, "COCO captions -> prepare_captions")


@pytest.fixture(scope="module")
def raw_vqa(tiny_world) -> dict[str, tuple[dict, dict]]:
    """The tiny world's VQA train and val questions and annotations, cut to 40 and 20 questions."""
    files = {}
    for split, count in (("train", 40), ("val", 20)):
        questions = json.loads(tiny_world.vqa_questions_jsonpath(split).read_text())
        annotations = json.loads(tiny_world.vqa_annotations_jsonpath(split).read_text())
        kept = questions["questions"][:count]
        ids = {q["question_id"] for q in kept}
        files[split] = (
            {**questions, "questions": kept},
            {
                **annotations,
                "annotations": [a for a in annotations["annotations"] if a["question_id"] in ids],
            },
        )
    return files


@budgets(40, 2500)
def test_vqa_json_through_prepare_vqa(budget, raw_vqa):
    main = tool("prepare_vqa")

    def argv_for(folder: Path) -> list[str]:
        splits = [f"{s}={folder / f'q_{s}.json'},{folder / f'a_{s}.json'}" for s in raw_vqa]
        return [
            *(a for s in splits for a in ("--split", s)),
            "--min-answer-count",
            "1",
            "--output",
            str(folder / "out"),
        ]

    def write_clean(folder: Path) -> None:
        for split, (questions_file, annotations_file) in raw_vqa.items():
            write_json(folder / f"q_{split}.json", questions_file)
            write_json(folder / f"a_{split}.json", annotations_file)

    def prepared(output: Path) -> dict[str, bytes]:
        # annotations_<split>.json are the input annotations copied unchanged: a field nothing reads is copied
        # as it is. The result is what preparation derives from them.
        return {
            name: data for name, data in files_under(output).items() if not name.startswith("annotations_")
        }

    with scratch() as folder:
        write_clean(folder)
        assert invoke(main, argv_for(folder))[0] == 0
        clean = prepared(folder / "out")

    def check(data):
        with scratch() as folder:
            write_clean(folder)
            split = data.draw(st.sampled_from(sorted(raw_vqa)), label="split")
            which = data.draw(st.sampled_from(["q", "a"]), label="file")
            document = raw_vqa[split][0 if which == "q" else 1]
            entity = ("questions",) if which == "q" else ("annotations",)
            # multiple_choice_answer may be absent: the majority of the human answers replaces it (documented).
            json_input(
                data,
                folder / f"{which}_{split}.json",
                document,
                (entity,),
                frozenset({"multiple_choice_answer"}),
            )
            return check_contract(main, argv_for(folder), folder, lambda _: prepared(folder / "out"), clean)

    fuzz(budget, check, "VQA questions/annotations -> prepare_vqa")


# ----------------------------------------------------------------------------------------------------------
# Prepared files -> build_cider_df and updown.predict.


@budgets(40, 2000)
def test_prepared_captions_through_build_cider_df(budget, tiny_world):
    main = tool("build_cider_df")
    document = json.loads((tiny_world.captions_dir / "captions.json").read_text())
    document = {
        "images": document["images"][:10] + [i for i in document["images"] if i["split"] != "train"][:4]
    }

    def argv_for(folder: Path) -> list[str]:
        return ["--captions", str(folder / "captions.json"), "--output", str(folder / "out" / "df.json")]

    with scratch() as folder:
        write_json(folder / "captions.json", document)
        assert invoke(main, argv_for(folder))[0] == 0
        clean = files_under(folder / "out")

    def check(data):
        with scratch() as folder:
            json_input(data, folder / "captions.json", document, (("images",),))
            return check_contract(
                main, argv_for(folder), folder, lambda _: files_under(folder / "out"), clean
            )

    fuzz(budget, check, "prepared captions -> build_cider_df")


@pytest.fixture(scope="module")
def caption_checkpoint(tiny_captioning_run) -> Path:
    return tiny_captioning_run / "checkpoints" / "last.ckpt"


def predict_captions_argv(folder: Path, tiny_world, checkpoint, captions=None, vocabulary=None) -> list[str]:
    return [
        "captions", "--checkpoint", str(checkpoint), "--features", str(tiny_world.features_h5path),
        "--captions", str(captions or tiny_world.captions_dir / "captions.json"),
        "--vocabulary", str(vocabulary or tiny_world.captions_dir / "vocabulary.json"),
        "--output", str(folder / "out" / "results.json"), "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def clean_captions(tiny_world, caption_checkpoint) -> dict:
    with scratch() as folder:
        code, _, err = invoke(
            updown.predict.main, predict_captions_argv(folder, tiny_world, caption_checkpoint)
        )
        assert code == 0, err
        return files_under(folder / "out")


@budgets(12, 600)
def test_prepared_captions_and_vocabulary_through_predict(
    budget, tiny_world, caption_checkpoint, clean_captions
):
    captions = json.loads((tiny_world.captions_dir / "captions.json").read_text())
    vocabulary = json.loads((tiny_world.captions_dir / "vocabulary.json").read_text())

    def check(data):
        with scratch() as folder:
            if data.draw(st.booleans(), label="vocabulary"):
                json_input(data, folder / "vocabulary.json", vocabulary, (("tokens",),))
                write_json(folder / "captions.json", captions)
            else:
                json_input(data, folder / "captions.json", captions, (("images",),))
                write_json(folder / "vocabulary.json", vocabulary)
            argv = predict_captions_argv(
                folder, tiny_world, caption_checkpoint, folder / "captions.json", folder / "vocabulary.json"
            )
            return check_contract(
                updown.predict.main,
                argv,
                folder / "out",
                lambda _: files_under(folder / "out"),
                clean_captions,
            )

    fuzz(budget, check, "prepared captions/vocabulary -> predict")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints -> updown.predict.


@budgets(25, 1000)
def test_damaged_checkpoints_through_predict(budget, tiny_world, caption_checkpoint, clean_captions):
    raw = caption_checkpoint.read_bytes()
    loaded = torch.load(caption_checkpoint, map_location="cpu", weights_only=False)

    def damaged(data, path: Path) -> None:
        kind = data.draw(st.sampled_from(["truncate", "flip", "delete"]), label="damage")
        if kind == "truncate":
            path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="length")])
        elif kind == "flip":
            flipped = bytearray(raw)
            position = data.draw(st.integers(0, len(raw) - 1), label="position")
            flipped[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
            path.write_bytes(bytes(flipped))
        else:
            checkpoint = copy.deepcopy(loaded)
            # A top-level key, a weight, or a field of the stored data description.
            where = data.draw(st.sampled_from(["top", "state_dict", "data_spec"]), label="where")
            node = checkpoint if where == "top" else checkpoint[where]
            del node[data.draw(st.sampled_from(sorted(node)), label="key")]
            torch.save(checkpoint, path)

    def check(data):
        with scratch() as folder:
            damaged(data, folder / "damaged.ckpt")
            argv = predict_captions_argv(folder, tiny_world, folder / "damaged.ckpt")
            return check_contract(
                updown.predict.main,
                argv,
                folder / "out",
                lambda _: files_under(folder / "out"),
                clean_captions,
            )

    fuzz(budget, check, "checkpoints -> predict")


# ----------------------------------------------------------------------------------------------------------
# Results files -> updown.evaluate.


@pytest.fixture(scope="module")
def prepared_vqa(tiny_world) -> Path:
    from updown.data.vqa_data import ensure_synthetic_vqa

    return ensure_synthetic_vqa(tiny_world)


@budgets(60, 3000)
def test_vqa_results_questions_and_annotations_through_evaluate(budget, prepared_vqa):
    questions = json.loads((prepared_vqa / "questions_val.json").read_text())
    annotations = json.loads((prepared_vqa / "annotations_val.json").read_text())
    questions = {**questions, "questions": questions["questions"][:30]}
    ids = {q["question_id"] for q in questions["questions"]}
    annotations = {
        **annotations,
        "annotations": [a for a in annotations["annotations"] if a["question_id"] in ids],
    }
    answers = ["yes", "no", "2", "red", "dog"]
    results = [
        {"question_id": q["question_id"], "answer": answers[k % 5]}
        for k, q in enumerate(questions["questions"])
    ]
    documents = {"questions": questions, "annotations": annotations, "results": results}
    lists = {"questions": (("questions",),), "annotations": (("annotations",),), "results": ((),)}

    def argv_for(folder: Path) -> list[str]:
        return ["vqa", *(a for name in ("questions", "annotations", "results") for a in (f"--{name}", str(folder / f"{name}.json"))),
                "--output", str(folder / "out" / "scores.json")]  # fmt: skip

    with scratch() as folder:
        for name, document in documents.items():
            write_json(folder / f"{name}.json", document)
        code, _, err = invoke(updown.evaluate.main, argv_for(folder))
        assert code == 0, err
        clean = files_under(folder / "out")

    def check(data):
        with scratch() as folder:
            target = data.draw(st.sampled_from(sorted(documents)), label="file")
            for name, document in documents.items():
                if name == target:
                    json_input(data, folder / f"{name}.json", document, lists[name])
                else:
                    write_json(folder / f"{name}.json", document)
            return check_contract(
                updown.evaluate.main,
                argv_for(folder),
                folder / "out",
                lambda _: files_under(folder / "out"),
                clean,
            )

    fuzz(budget, check, "VQA results/questions/annotations -> evaluate")


@budgets(8, 300)
def test_caption_results_and_references_through_evaluate(budget, tiny_world):
    references = json.loads((tiny_world.captions_dir / "references_val.json").read_text())
    keep = {image["id"] for image in references["images"][:4]}
    references = {
        **references, "images": [i for i in references["images"] if i["id"] in keep],
        "annotations": [a for a in references["annotations"] if a["image_id"] in keep],
    }  # fmt: skip
    results = [{"image_id": i, "caption": "a small red dog"} for i in sorted(keep)]
    documents = {"references": references, "results": results}
    lists = {"references": (("images",), ("annotations",)), "results": ((),)}

    def argv_for(folder: Path) -> list[str]:
        return ["captions", "--references", str(folder / "references.json"), "--results", str(folder / "results.json"),
                "--metrics", "Bleu", "CIDEr", "--spice", "off", "--output", str(folder / "out" / "scores.json")]  # fmt: skip

    with scratch() as folder:
        for name, document in documents.items():
            write_json(folder / f"{name}.json", document)
        code, _, err = invoke(updown.evaluate.main, argv_for(folder))
        assert code == 0, err
        clean = files_under(folder / "out")

    def check(data):
        with scratch() as folder:
            target = data.draw(st.sampled_from(sorted(documents)), label="file")
            for name, document in documents.items():
                if name == target:
                    # A repeated reference caption is a valid reference set (its scores differ): repeat images only.
                    json_input(data, folder / f"{name}.json", document, lists[name][:1])
                else:
                    write_json(folder / f"{name}.json", document)
            return check_contract(
                updown.evaluate.main,
                argv_for(folder),
                folder / "out",
                lambda _: files_under(folder / "out"),
                clean,
            )

    fuzz(budget, check, "caption results/references -> evaluate")


# ----------------------------------------------------------------------------------------------------------
# YAML configs -> updown.fit --print_config.

# Every recipe: --print_config parses a config without reading its data.
CONFIGS = sorted(str(path.relative_to(ROOT / "configs")) for path in (ROOT / "configs").glob("*/*.yaml"))


def declared_numbers(cls: type, prefix: tuple) -> list[tuple[tuple, type]]:
    """(config path, restricted number type or ``Literal``) of every numeric or choice argument of ``cls`` (its
    ``__init__`` chain, and the fields of the config dataclasses it takes), as LightningCLI exposes them."""
    found, seen = [], set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None or not callable(init):
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:
            continue
        for name, annotation in hints.items():
            if name in seen or name == "return":
                continue
            seen.add(name)
            found += _numbers_of(annotation, (*prefix, name))
    return found


def _numbers_of(annotation: Any, path: tuple) -> list[tuple[tuple, type]]:
    kind = restricted_number(annotation)
    if kind is not None:
        return [(path, kind)]
    if literal_choices(annotation) is not None:
        return [(path, annotation)]
    members = [m for m in typing.get_args(annotation) if m is not type(None)] or [annotation]
    for member in members:
        if dataclasses.is_dataclass(member):
            hints = typing.get_type_hints(member)
            return [
                n
                for field in dataclasses.fields(member)
                for n in _numbers_of(hints[field.name], (*path, field.name))
            ]
    return []


def config_classes(config: dict) -> list[tuple[tuple, type]]:
    import pydoc

    numbers = []
    for key in ("model", "data"):
        cls = pydoc.locate(config[key]["class_path"])
        numbers += declared_numbers(cls, (key, "init_args"))
    return numbers


def out_of_range(kind: type) -> st.SearchStrategy:
    """Numbers (and non-numbers) that ``kind`` refuses; for a ``Literal``, values that are not among its choices."""
    choices = literal_choices(kind)
    if choices is not None:
        return st.sampled_from(["sse", "SGD", "off ", "", 3, 0.5, [1]]).filter(lambda v: v not in choices)

    def refused(value) -> bool:
        try:
            kind(value)
        except (ValueError, TypeError):
            return True
        return False

    numbers = st.one_of(
        st.integers(-(10**6), 10**6),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0, -1, 0.5, 1.0, 1.5]),
    )
    return st.one_of(numbers.filter(refused), st.sampled_from(["abc", [1], {"a": 1}, True]))


def set_at(document: dict, path: tuple, value: Any) -> None:
    node = document
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


@budgets(60, 2500)
def test_yaml_configs_through_fit_print_config(budget):
    configs = {name: yaml.safe_load((ROOT / "configs" / name).read_text()) for name in CONFIGS}
    for name in configs:
        assert (
            invoke(updown.fit.main, ["--config", str(ROOT / "configs" / name), "--print_config"])[0] == 0
        ), name
    numbers = {name: config_classes(config) for name, config in configs.items()}

    def check(data):
        name = data.draw(st.sampled_from(sorted(configs)), label="config")
        document = copy.deepcopy(configs[name])
        kind = data.draw(st.sampled_from(["range", "unknown", "syntax"]), label="mutation")
        option = None
        with scratch() as folder:
            path = folder / "config.yaml"
            if kind == "syntax":
                text = yaml.safe_dump(document) + data.draw(
                    st.sampled_from(["model: [1, 2\n", "\tbad: tab\n", "data: {a\n"]), label="tail"
                )
                path.write_text(text)
            else:
                if kind == "range":
                    where, number = data.draw(st.sampled_from(numbers[name]), label="field")
                    set_at(document, where, data.draw(out_of_range(number), label="value"))
                else:
                    sections = [
                        ("model", "init_args"),
                        ("data", "init_args"),
                        ("trainer",),
                        (),
                        ("model", "init_args", "optimizer"),
                    ]
                    where = (*data.draw(st.sampled_from(sections), label="section"), "zz_unknown_option")
                    set_at(document, where, 1)
                option = where[-1]
                path.write_text(yaml.safe_dump(document))
            return check_contract(
                updown.fit.main,
                ["--config", str(path), "--print_config"],
                folder,
                lambda out: out,
                None,
                option,
            )

    fuzz(budget, check, "YAML configs -> fit --print_config")


@budgets(40, 1500)
def test_numeric_command_line_options(budget, tiny_world):
    """Out-of-range numbers of the argparse tools' options, and of updown.fit's, are refused naming the option."""
    from updown.config import NonNegativeInt, PositiveInt
    from updown.data.synthetic import SyntheticSpec

    hints = typing.get_type_hints(SyntheticSpec)
    captions = str(tiny_world.captions_dir / "captions.json")
    commands = [
        (tool("prepare_captions"), ["--karpathy", str(tiny_world.dataset_coco_jsonpath)], "--min-count", PositiveInt),
        (tool("build_cider_df"), ["--captions", captions], "--n", PositiveInt),
        (tool("prepare_vqa"), ["--split", f"train={tiny_world.vqa_questions_jsonpath('train')}"], "--min-answer-count", PositiveInt),
        (tool("prepare_vqa"), ["--split", f"train={tiny_world.vqa_questions_jsonpath('train')}"], "--max-question-length", PositiveInt),
        (updown.predict.main, ["captions", "--checkpoint", "x.ckpt"], "--beam-size", PositiveInt),
        (updown.predict.main, ["vqa", "--checkpoint", "x.ckpt"], "--num-workers", NonNegativeInt),
        (updown.predict.main, ["vqa", "--checkpoint", "x.ckpt"], "--batch-size", PositiveInt),
        *[(tool("make_synthetic"), [], "--" + f.name.replace("_", "-"), hints[f.name]) for f in dataclasses.fields(SyntheticSpec)
          if restricted_number(hints[f.name]) is not None],
        (updown.fit.main, [*synthetic_world_args(tiny_world.root.parent), "--print_config"], "--data.init_args.batch_size", PositiveInt),
        (updown.fit.main, ["--print_config"], "--model.init_args.decoding.beam_size", PositiveInt),
    ]  # fmt: skip

    def check(data):
        main, argv, flag, kind = data.draw(st.sampled_from(commands), label="command")
        value = data.draw(
            out_of_range(kind).filter(lambda v: not isinstance(v, (list, dict, bool))), label="value"
        )
        with scratch() as folder:
            out = ["--output", str(folder / "out")] if main is not updown.fit.main else []
            argv = [*argv, *out, f"{flag}={value}"]
            return check_contract(main, argv, folder, lambda _: None, "never", flag.lstrip("-"))

    fuzz(budget, check, "numeric options")


def test_the_declared_numbers_are_found():
    """A sanity check of the introspection the YAML property draws its fields from."""
    from updown.tasks.captioning import CaptioningTask
    from updown.tasks.optim import OptimizerConfig

    assert literal_choices(typing.get_type_hints(OptimizerConfig)["name"]) == (
        "sgd",
        "adam",
        "adamax",
        "adadelta",
    )
    numbers = dict(declared_numbers(CaptioningTask, ("model", "init_args")))
    for path in (
        "decoding.beam_size",
        "net.dropout",
        "label_smoothing",
        "optimizer.lr",
        "scheduled_sampling.probability",
    ):
        assert ("model", "init_args", *path.split(".")) in numbers, path
