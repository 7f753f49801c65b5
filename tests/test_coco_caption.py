"""The official caption scorer: reproduce the COCO toolkit's published numbers, SPICE policy, human consensus."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from conftest import REALDATA

from updown.metrics import coco_caption
from updown.metrics.coco_caption import (
    MissingDependencyError,
    human_consensus,
    score_captions,
    spice_available,
)

COCO_DIR = REALDATA / "coco-caption"
pytestmark = pytest.mark.skipif(
    shutil.which("java") is None, reason="pycocoevalcap's tokenizer and METEOR need java"
)
needs_no_spice = pytest.mark.skipif(spice_available(), reason="the SPICE jars are installed here")

REFERENCES = {
    1: ["A dog runs on the grass.", "a brown dog running", "The dog is running outside."],
    2: ["Two cats sit on a red sofa.", "cats on a couch", "two cats resting on a sofa"],
}


def _fakecap() -> tuple[dict[int, list[str]], dict[int, str]]:
    ground_truth = json.loads((COCO_DIR / "captions_val2014_fakecap_gt.json").read_text())
    references: dict[int, list[str]] = {image["id"]: [] for image in ground_truth["images"]}
    for annotation in ground_truth["annotations"]:
        references[annotation["image_id"]].append(annotation["caption"])
    results = json.loads((COCO_DIR / "captions_val2014_fakecap_results.json").read_text())
    return references, {result["image_id"]: result["caption"] for result in results}


def test_reproduces_published_scores_at_full_precision() -> None:
    references, predictions = _fakecap()
    overall, per_image = score_captions(references, predictions, spice="off")
    published = json.loads((COCO_DIR / "expected_scores.json").read_text())
    expected = published["reproduced_full_precision_pycocoevalcap_1.2_on_captions_val2014_fakecap_gt.json"]
    assert set(overall) == set(expected)
    for name, value in expected.items():
        assert overall[name] == pytest.approx(value, rel=0, abs=1e-12), name
        assert round(overall[name], 3) == published["printed_3dp"][name], name  # the demo notebook's printout
    expected_per_image = json.loads(
        (COCO_DIR / "expected_per_image_scores_pycocoevalcap1.2.json").read_text()
    )
    assert len(per_image) == len(expected_per_image) == 1000
    for image_id, scores in expected_per_image.items():
        for name, value in scores.items():
            assert per_image[int(image_id)][name] == pytest.approx(value, rel=0, abs=1e-12), (image_id, name)


def test_empty_prediction_scores_zero_without_crashing() -> None:
    overall, per_image = score_captions(REFERENCES, {1: "", 2: "two cats on a sofa"}, spice="off")
    assert per_image[1]["CIDEr"] == 0.0 and per_image[1]["Bleu_1"] == 0.0 and per_image[1]["METEOR"] == 0.0
    assert per_image[2]["CIDEr"] > 0.5 and per_image[2]["Bleu_1"] > 0.8
    assert overall["CIDEr"] == pytest.approx((per_image[1]["CIDEr"] + per_image[2]["CIDEr"]) / 2)


def test_ids_must_match_exactly() -> None:
    with pytest.raises(ValueError, match=r"1 images have no prediction \(2\)"):
        score_captions(REFERENCES, {1: "a dog"}, spice="off")
    with pytest.raises(ValueError, match=r"1 predictions have no references \(7\)"):
        score_captions(REFERENCES, {1: "a dog", 2: "cats", 7: "x"}, spice="off")
    with pytest.raises(ValueError, match="unknown names"):
        score_captions(REFERENCES, {1: "a dog", 2: "cats"}, metrics=("BLEU",))
    with pytest.raises(ValueError, match="non-empty list"):
        score_captions({1: []}, {1: "a dog"})


@needs_no_spice
def test_spice_auto_warns_once_and_on_raises_without_jars(monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.spice.get_stanford_models as downloader

    def no_download(*args, **kwargs):
        raise AssertionError("SPICE tried to download Stanford CoreNLP")

    monkeypatch.setattr(downloader, "urlretrieve", no_download)
    predictions = {1: "a dog", 2: "two cats"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        overall, per_image = score_captions(REFERENCES, predictions, spice="auto", metrics=("Bleu", "SPICE"))
    spice_warnings = [w for w in caught if "SPICE" in str(w.message)]
    assert len(spice_warnings) == 1 and "stanford" in str(spice_warnings[0].message).lower()
    assert "SPICE" not in overall and "SPICE" not in per_image[1] and "Bleu_4" in overall
    with pytest.raises(MissingDependencyError, match="stanford-corenlp-3.6.0.jar"):
        score_captions(REFERENCES, predictions, spice="on", metrics=("Bleu", "SPICE"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        overall, _ = score_captions(REFERENCES, predictions, spice="off", metrics=("CIDEr", "SPICE"))
    assert not [w for w in caught if "SPICE" in str(w.message)] and set(overall) == {"CIDEr"}


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coco_caption.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="openjdk-17-jre-headless"):
        score_captions(REFERENCES, {1: "a dog", 2: "cats"}, spice="off")


def test_human_consensus_equals_leave_one_out_by_hand() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    references, _ = _fakecap()
    references = dict(list(references.items())[:150])
    fewest = min(len(refs) for refs in references.values())
    tokenized = PTBTokenizer().tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    expected = {"Bleu_4": 0.0, "CIDEr": 0.0}
    for j in range(fewest):
        gts = {k: refs[:j] + refs[j + 1 :] for k, refs in tokenized.items()}
        res = {k: [refs[j]] for k, refs in tokenized.items()}
        expected["Bleu_4"] += Bleu(4).compute_score(gts, res, verbose=0)[0][3] / fewest
        expected["CIDEr"] += Cider().compute_score(gts, res)[0] / fewest
    consensus = human_consensus(references, spice="off", metrics=("Bleu", "CIDEr"))
    assert set(consensus) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
    assert consensus["Bleu_4"] == pytest.approx(expected["Bleu_4"], abs=1e-12)
    assert consensus["CIDEr"] == pytest.approx(expected["CIDEr"], abs=1e-12)
    with pytest.raises(ValueError, match="single reference"):
        human_consensus({1: ["a dog"], 2: ["a cat", "cats"]}, spice="off")
