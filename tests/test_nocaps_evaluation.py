"""nocaps evaluation: every metric per domain and overall, each equal to pycocoevalcap run on that subset.

The fixture is nocaps-shaped (COCO-format ground truth whose ``images`` carry a ``domain``) and is cut at run
time from the real fakecap files of tests/data/coco-caption, with domains assigned to the images by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REALDATA

from updown.evaluate import main, read_references_and_domains
from updown.metrics.coco_caption import OVERALL, score_captions_by_domain

COCO_DIR = REALDATA / "coco-caption"
pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs java")
DOMAINS = ("in-domain", "near-domain", "out-domain")


def _domain(position: int) -> str:
    # Interleaved and of uneven sizes, as nocaps' domains are, so that a subset scored in the wrong order or
    # from the wrong images cannot pass.
    return ("near-domain", "out-domain", "near-domain", "in-domain", "near-domain", "out-domain")[
        position % 6
    ]


def _nocaps_files(tmp_path: Path, num_images: int) -> tuple[Path, Path]:
    """The first fakecap images as nocaps-style ground truth (with domains) and their results."""
    ground_truth = json.loads((COCO_DIR / "captions_val2014_fakecap_gt.json").read_text())
    images = [{**image, "domain": _domain(i)} for i, image in enumerate(ground_truth["images"][:num_images])]
    keep = {image["id"] for image in images}
    gt = {"images": images, "annotations": [a for a in ground_truth["annotations"] if a["image_id"] in keep]}
    results = json.loads((COCO_DIR / "captions_val2014_fakecap_results.json").read_text())
    (tmp_path / "nocaps_gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps([r for r in results if r["image_id"] in keep]))
    return tmp_path / "nocaps_gt.json", tmp_path / "results.json"


def _pycocoevalcap_on_subset(gt_path: Path, results_path: Path, domain: str | None, meteor=None) -> dict:
    """pycocoevalcap's own tokenizer and scorers on the images of one domain (None: all), as COCOEvalCap runs.

    ``meteor``: a pycocoevalcap ``Meteor`` scorer to add METEOR with (its start-up takes seconds, so it is shared).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gt = json.loads(gt_path.read_text())
    ids = [image["id"] for image in gt["images"] if domain is None or image["domain"] == domain]
    gts = {i: [] for i in ids}
    for annotation in gt["annotations"]:
        if annotation["image_id"] in gts:
            gts[annotation["image_id"]].append({"caption": annotation["caption"]})
    res = {
        r["image_id"]: [{"caption": r["caption"]}]
        for r in json.loads(results_path.read_text())
        if r["image_id"] in gts
    }
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    res = {i: res[i] for i in gts}  # COCOEvalCap's image order: that of the ground truth
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n + 1}": bleu[n] for n in range(4)}
    scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    if meteor is not None:
        scores["METEOR"] = meteor.compute_score(gts, res)[0]
    return scores


def test_cli_reports_each_domain_like_pycocoevalcap_on_its_subset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gt, results = _nocaps_files(tmp_path, num_images=90)
    output, per_image = tmp_path / "scores.json", tmp_path / "per_image.json"
    argv = ["captions", "--references", str(gt), "--results", str(results), "--spice", "off"]
    argv += [
        "--metrics",
        "Bleu",
        "ROUGE_L",
        "CIDEr",
        "--output",
        str(output),
        "--per-image-output",
        str(per_image),
    ]
    assert main(argv) == 0
    scores = json.loads(output.read_text())
    assert list(scores["by_domain"]) == list(DOMAINS)
    for domain in DOMAINS:
        expected = _pycocoevalcap_on_subset(gt, results, domain)
        assert set(scores["by_domain"][domain]) == set(expected)
        for name, value in expected.items():
            assert scores["by_domain"][domain][name] == pytest.approx(value, rel=0, abs=1e-12), (domain, name)
    expected = _pycocoevalcap_on_subset(gt, results, None)
    assert {name: value for name, value in scores.items() if name != "by_domain"} == pytest.approx(
        expected, rel=0, abs=1e-12
    )
    # A domain is scored as a ground truth of its own (CIDEr's document frequencies from its references),
    # which is not the mean of its images' per-image scores in the overall run.
    written = json.loads(per_image.read_text())
    _, domains = read_references_and_domains(str(gt))
    in_domain = [written[str(i)]["CIDEr"] for i, d in domains.items() if d == "in-domain"]
    assert abs(sum(in_domain) / len(in_domain) - scores["by_domain"]["in-domain"]["CIDEr"]) > 1e-3
    printed = capsys.readouterr().out
    assert "in-domain 15, near-domain 45, out-domain 30" in printed
    assert all(column in printed for column in (*DOMAINS, OVERALL))
    assert f"{scores['by_domain']['out-domain']['CIDEr']:.4f}" in printed


@pytest.mark.slow  # two METEOR start-ups: about 30 s on 2 cores
def test_library_scores_meteor_per_domain_too(tmp_path: Path) -> None:
    from pycocoevalcap.meteor.meteor import Meteor

    gt, results = _nocaps_files(tmp_path, num_images=24)
    references, domains = read_references_and_domains(str(gt))
    predictions = {r["image_id"]: r["caption"] for r in json.loads(results.read_text())}
    scores, per_image = score_captions_by_domain(references, predictions, domains, spice="off")
    assert list(scores) == [*DOMAINS, OVERALL] and set(per_image) == set(references)
    meteor = Meteor()
    try:
        for domain in (*DOMAINS, None):
            expected = _pycocoevalcap_on_subset(gt, results, domain, meteor)
            assert set(scores[domain or OVERALL]) == set(expected)
            for name, value in expected.items():
                assert scores[domain or OVERALL][name] == pytest.approx(value, rel=0, abs=1e-12), (
                    domain,
                    name,
                )
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    with pytest.raises(ValueError, match=r"1 images \(.*\) have no domain"):
        score_captions_by_domain(references, predictions, dict(list(domains.items())[1:]), spice="off")


def test_coco_references_without_domains_are_unchanged(tmp_path: Path) -> None:
    gt, results = _nocaps_files(tmp_path, num_images=30)
    coco = json.loads(gt.read_text())
    for image in coco["images"]:
        del image["domain"]
    (tmp_path / "coco_gt.json").write_text(json.dumps(coco))
    argv = ["captions", "--results", str(results), "--spice", "off", "--metrics", "Bleu", "CIDEr"]
    assert (
        main([*argv, "--references", str(tmp_path / "coco_gt.json"), "--output", str(tmp_path / "c.json")])
        == 0
    )
    assert main([*argv, "--references", str(gt), "--output", str(tmp_path / "n.json")]) == 0
    coco_scores, nocaps_scores = (json.loads((tmp_path / name).read_text()) for name in ("c.json", "n.json"))
    assert "by_domain" not in coco_scores
    # The overall nocaps scores are the COCO scores of the same images.
    assert {k: v for k, v in nocaps_scores.items() if k != "by_domain"} == coco_scores


def test_human_consensus_per_domain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from updown.metrics.coco_caption import human_consensus, spice_available

    gt, _ = _nocaps_files(tmp_path, num_images=30)
    output = tmp_path / "human.json"
    argv = ["captions", "--references", str(gt), "--human", "--metrics", "CIDEr"]
    # Without the SPICE jars, asking for SPICE warns once, not once per domain.
    argv += ["--spice", "off"] if spice_available() else ["SPICE", "--spice", "auto"]
    assert main([*argv, "--output", str(output)]) == 0
    assert capsys.readouterr().err.count("warning: SPICE skipped") == (0 if spice_available() else 1)
    scores = json.loads(output.read_text())
    references, domains = read_references_and_domains(str(gt))
    for domain in DOMAINS:
        subset = {k: refs for k, refs in references.items() if domains[k] == domain}
        expected = human_consensus(subset, spice="off", metrics=("CIDEr",))["CIDEr"]
        assert scores["by_domain"][domain]["CIDEr"] == pytest.approx(expected, abs=1e-12)
    assert scores["CIDEr"] == pytest.approx(
        human_consensus(references, spice="off", metrics=("CIDEr",))["CIDEr"], abs=1e-12
    )


def test_nocaps_reference_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt, results = _nocaps_files(tmp_path, num_images=6)
    data = json.loads(gt.read_text())
    out = tmp_path / "out.json"
    argv = ["captions", "--results", str(results), "--spice", "off", "--output", str(out), "--references"]

    def fails(content: dict, *needles: str) -> None:
        path = tmp_path / "bad_gt.json"
        path.write_text(json.dumps(content))
        assert main([*argv, str(path)]) == 2
        error = capsys.readouterr().err
        assert error.count("error:") == 1 and "Traceback" not in error, error
        for needle in (str(path), *needles):
            assert needle in error, error
        assert not out.exists()

    # Some images with a domain, one without.
    images = [dict(image) for image in data["images"]]
    del images[2]["domain"]
    fails({**data, "images": images}, 'lack a "domain" string', str(images[2]["id"]))
    # The nocaps test split's image info: domains, no captions.
    fails({"images": data["images"]}, "evaluation server")
    # A caption of an image that is not listed has no domain.
    stray = {"image_id": 987654, "id": 1, "caption": "a dog"}
    fails({**data, "annotations": [*data["annotations"], stray]}, "987654", "no domain")
