"""`python -m updown.evaluate`: real files end to end, and every user error exits 2 without output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REALDATA

from updown.evaluate import main
from updown.metrics.coco_caption import spice_available
from updown.metrics.vqa_accuracy import evaluate_vqa

COCO_DIR, VQA_DIR = REALDATA / "coco-caption", REALDATA / "vqa"
GT, RESULTS = (
    COCO_DIR / "captions_val2014_fakecap_gt.json",
    COCO_DIR / "captions_val2014_fakecap_results.json",
)
QUESTIONS = VQA_DIR / "v2_OpenEnded_mscoco_val2014_questions.first100.json"
ANNOTATIONS = VQA_DIR / "v2_mscoco_val2014_annotations.first100.json"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs java")


def _small_coco(tmp_path: Path, num_images: int = 20) -> tuple[Path, Path]:
    """The first images of the fakecap files, as COCO ground truth and results files."""
    ground_truth = json.loads(GT.read_text())
    images = ground_truth["images"][:num_images]
    keep = {image["id"] for image in images}
    gt = {"images": images, "annotations": [a for a in ground_truth["annotations"] if a["image_id"] in keep]}
    results = [r for r in json.loads(RESULTS.read_text()) if r["image_id"] in keep]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    return tmp_path / "gt.json", tmp_path / "res.json"


@needs_java
def test_captions_reproduce_published_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output, per_image = tmp_path / "scores.json", tmp_path / "per_image.json"
    # METEOR's Java start-up dominates; test_coco_caption.py checks it on these files through the library.
    argv = ["captions", "--references", str(GT), "--results", str(RESULTS), "--spice", "off"]
    argv += ["--metrics", "Bleu", "ROUGE_L", "CIDEr"]
    assert main([*argv, "--output", str(output), "--per-image-output", str(per_image)]) == 0
    scores = json.loads(output.read_text())
    published = json.loads((COCO_DIR / "expected_scores.json").read_text())
    expected = published["reproduced_full_precision_pycocoevalcap_1.2_on_captions_val2014_fakecap_gt.json"]
    del expected["METEOR"]
    assert set(scores) == set(expected)
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, rel=0, abs=1e-12), name
    expected_per_image = json.loads(
        (COCO_DIR / "expected_per_image_scores_pycocoevalcap1.2.json").read_text()
    )
    written = json.loads(per_image.read_text())
    assert written["404464"]["CIDEr"] == pytest.approx(expected_per_image["404464"]["CIDEr"], abs=1e-12)
    printed = capsys.readouterr().out
    assert "CIDEr" in printed and f"{expected['CIDEr']:.4f}" in printed


@needs_java
def test_captions_human_consensus(tmp_path: Path) -> None:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gt, _ = _small_coco(tmp_path, num_images=100)
    output = tmp_path / "human.json"
    argv = ["captions", "--references", str(gt), "--human", "--spice", "off", "--metrics", "Bleu", "CIDEr"]
    assert main([*argv, "--output", str(output)]) == 0
    scores = json.loads(output.read_text())
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
    # CIDEr of each held-out reference against the others, averaged over which one is held out.
    references: dict[int, list[dict]] = {}
    for annotation in json.loads(gt.read_text())["annotations"]:
        references.setdefault(annotation["image_id"], []).append({"caption": annotation["caption"]})
    tokenized = PTBTokenizer().tokenize(references)
    fewest = min(len(refs) for refs in tokenized.values())
    expected = sum(
        Cider().compute_score({k: r[:j] + r[j + 1 :] for k, r in tokenized.items()}, {k: [r[j]] for k, r in tokenized.items()})[0]
        for j in range(fewest)
    ) / fewest  # fmt: skip
    assert scores["CIDEr"] == pytest.approx(expected, abs=1e-12)


@needs_java
@pytest.mark.skipif(spice_available(), reason="the SPICE jars are installed here")
def test_spice_auto_warns_once_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt, res = _small_coco(tmp_path, num_images=3)
    argv = ["captions", "--references", str(gt), "--results", str(res), "--metrics", "CIDEr", "SPICE"]
    assert main([*argv, "--output", str(tmp_path / "out.json")]) == 0
    error = capsys.readouterr().err
    assert error.count("warning: SPICE skipped") == 1 and "Traceback" not in error
    assert set(json.loads((tmp_path / "out.json").read_text())) == {"CIDEr"}


@pytest.mark.parametrize("normalization", ["official", "legacy"])
def test_vqa_scores_match_the_library(tmp_path: Path, normalization: str) -> None:
    results = VQA_DIR / "results_mc_answer_decorated.json"
    output = tmp_path / "vqa.json"
    argv = [
        "vqa",
        "--questions",
        str(QUESTIONS),
        "--annotations",
        str(ANNOTATIONS),
        "--results",
        str(results),
    ]
    assert main([*argv, "--normalization", normalization, "--output", str(output)]) == 0
    expected = evaluate_vqa(
        json.loads(QUESTIONS.read_text()), json.loads(ANNOTATIONS.read_text()), json.loads(results.read_text()),
        normalization,
    )  # fmt: skip
    assert json.loads(output.read_text()) == expected


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], output: Path, *needles: str) -> None:
    assert main([*argv, "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.count("error:") == 1, error
    for needle in needles:
        assert needle in error, error
    assert not output.exists()


def test_caption_errors_exit_2_without_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt, res = _small_coco(tmp_path, num_images=3)
    out = tmp_path / "out.json"
    captions = ["captions", "--references", str(gt), "--spice", "off"]
    _fails([*captions, "--results", str(tmp_path / "nope.json")], capsys, out, "nope.json", "not found")
    (tmp_path / "empty.json").write_text("")
    _fails([*captions, "--results", str(tmp_path / "empty.json")], capsys, out, "empty.json", "empty")
    (tmp_path / "broken.json").write_text("[{")
    _fails(
        [*captions, "--results", str(tmp_path / "broken.json")], capsys, out, "broken.json", "not valid JSON"
    )
    results = json.loads(res.read_text())
    (tmp_path / "short.json").write_text(json.dumps(results[1:]))
    _fails(
        [*captions, "--results", str(tmp_path / "short.json")],
        capsys,
        out,
        "no prediction",
        str(results[0]["image_id"]),
    )
    (tmp_path / "extra.json").write_text(json.dumps([*results, {"image_id": 999999, "caption": "x"}]))
    _fails([*captions, "--results", str(tmp_path / "extra.json")], capsys, out, "999999")
    (tmp_path / "twice.json").write_text(json.dumps([*results, results[0]]))
    _fails([*captions, "--results", str(tmp_path / "twice.json")], capsys, out, "more than one caption")
    _fails([*captions, "--results", str(res), "--human"], capsys, out, "not both")
    _fails(["captions", "--references", str(res), "--results", str(res)], capsys, out, "annotations")
    if not spice_available() and shutil.which("java"):
        _fails(
            [*captions[:-2], "--results", str(res), "--spice", "on"], capsys, out, "SPICE", "stanford-corenlp"
        )
    with pytest.raises(FileNotFoundError):
        main([*captions, "--results", str(tmp_path / "nope.json"), "--debug"])
    assert main(["captions"]) == 2  # argparse: missing --references
    assert "--references" in capsys.readouterr().err


def test_vqa_errors_exit_2_without_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.json"
    vqa = ["vqa", "--questions", str(QUESTIONS), "--annotations", str(ANNOTATIONS)]
    results = json.loads((VQA_DIR / "results_all_yes.json").read_text())
    (tmp_path / "short.json").write_text(json.dumps(results[:-1]))
    _fails(
        [*vqa, "--results", str(tmp_path / "short.json")],
        capsys,
        out,
        "no result",
        str(results[-1]["question_id"]),
    )
    (tmp_path / "dict.json").write_text(json.dumps({"answers": results}))
    _fails([*vqa, "--results", str(tmp_path / "dict.json")], capsys, out, "expected a list")
    _fails([*vqa, "--results", str(GT)], capsys, out, "expected a list")
    _fails([*vqa, "--results", str(RESULTS)], capsys, out, "question_id")
    _fails(["vqa", "--questions", str(QUESTIONS), "--annotations", str(QUESTIONS), "--results", str(VQA_DIR / "results_all_yes.json")],
           capsys, out, "annotations")  # fmt: skip
    _fails([*vqa], capsys, out, "--results is required")


def test_import_does_not_load_lightning() -> None:
    code = "import sys, updown.evaluate; print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"
    command = [sys.executable, "-m", "updown.evaluate", "vqa", "--help"]
    shown = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert shown.returncode == 0 and "--normalization" in shown.stdout
