"""Fast CIDEr-D against pycocoevalcap's CiderScorer, per image and overall, plus its df file and tools."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import REALDATA
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from updown.metrics.cider import CiderD

ROOT = Path(__file__).resolve().parents[1]
COCO_DIR = REALDATA / "coco-caption"


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _synthetic(seed: int, num_images: int = 40) -> tuple[dict[int, list[list[str]]], dict[int, list[str]]]:
    """Captions over a tiny vocabulary so n-grams overlap; 1..7 references; empty, 1-word, repetitive hyps."""
    rng = random.Random(seed)
    vocabulary = ["a", "dog", "cat", "red", "bus", "on", "the", "street", "big", "sits"]
    references = {
        image: [rng.choices(vocabulary, k=rng.randint(1, 12)) for _ in range(rng.randint(1, 7))]
        for image in range(num_images)
    }
    hypotheses = {image: rng.choices(vocabulary, k=rng.randint(0, 14)) for image in references}
    hypotheses[0], hypotheses[1], hypotheses[2] = [], ["dog"], ["a", "dog"] * 6
    return references, hypotheses


def _pycocoevalcap(references, hypotheses) -> tuple[float, np.ndarray]:
    gts = {image: [" ".join(ref) for ref in refs] for image, refs in references.items()}
    res = {image: [" ".join(hypotheses[image])] for image in references}
    score, scores = Cider().compute_score(gts, res)
    return float(score), np.asarray(scores)


def _brute_force(references, hypotheses, n: int, sigma: float = 6.0) -> np.ndarray:
    """coco-caption's CIDEr-D from its definition, in plain loops (pycocoevalcap itself only runs n=4)."""

    def grams(words):
        counts = defaultdict(int)
        for k in range(1, n + 1):
            for i in range(len(words) - k + 1):
                counts[tuple(words[i : i + k])] += 1
        return counts

    df = defaultdict(float)
    for refs in references.values():
        for gram in {g for ref in refs for g in grams(ref)}:
            df[gram] += 1
    ref_len = math.log(len(references))

    def vector(words):
        vec = {g: tf * (ref_len - math.log(max(1.0, df[g]))) for g, tf in grams(words).items()}
        norms = [math.sqrt(sum(v * v for g, v in vec.items() if len(g) == k)) for k in range(1, n + 1)]
        length = sum(tf for g, tf in grams(words).items() if len(g) == 2)  # coco-caption counts bigrams
        return vec, norms, length

    scores = []
    for image, refs in references.items():
        hyp_vec, hyp_norms, hyp_length = vector(hypotheses[image])
        total = 0.0
        for ref in refs:
            ref_vec, ref_norms, ref_length = vector(ref)
            for k in range(1, n + 1):
                dot = sum(
                    min(v, ref_vec.get(g, 0.0)) * ref_vec.get(g, 0.0)
                    for g, v in hyp_vec.items()
                    if len(g) == k
                )
                if hyp_norms[k - 1] and ref_norms[k - 1]:
                    dot /= hyp_norms[k - 1] * ref_norms[k - 1]
                total += dot * math.exp(-((hyp_length - ref_length) ** 2) / (2 * sigma**2)) / n
        scores.append(10 * total / len(refs))
    return np.array(scores)


def test_equals_pycocoevalcap_on_synthetic_captions() -> None:
    references, hypotheses = _synthetic(seed=4)
    expected_mean, expected = _pycocoevalcap(references, hypotheses)
    cider = CiderD.from_references(references)
    scores = cider.score([hypotheses[image] for image in references], list(references))
    assert scores.shape == (len(references),)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)
    assert abs(scores.mean() - expected_mean) < 1e-9
    assert scores[0] == 0.0 and expected.max() > 0.5  # empty hypothesis scores 0; the test is not all zeros
    np.testing.assert_allclose(_brute_force(references, hypotheses, n=4), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize(("n", "sigma"), [(1, 6.0), (2, 6.0), (3, 2.0)])
def test_other_orders_and_sigma_equal_the_definition(n: int, sigma: float) -> None:
    references, hypotheses = _synthetic(seed=n)
    cider = CiderD.from_references(references, n=n, sigma=sigma)
    scores = cider.score([hypotheses[image] for image in references], list(references))
    np.testing.assert_allclose(scores, _brute_force(references, hypotheses, n, sigma), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "hypotheses",
    [{0: ["a"], 1: [], 2: ["dog", "dog"]}, {0: [], 1: [], 2: []}, {0: [], 1: ["zebra"], 2: ["x"]}],
)
def test_degenerate_batches_equal_pycocoevalcap(hypotheses: dict[int, list[str]]) -> None:
    references = {0: [[]], 1: [["a", "dog"], ["dog"]], 2: [["dog"], [], ["a", "dog", "dog"]]}
    _, expected = _pycocoevalcap(references, hypotheses)
    scores = CiderD.from_references(references).score([hypotheses[k] for k in references], list(references))
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)


def test_several_samples_per_image_with_fixed_document_frequencies() -> None:
    """The SCST case: k samples per image, df and ref_len fixed in advance (here: set inside CiderScorer)."""
    references, _ = _synthetic(seed=7, num_images=20)
    rng = random.Random(8)
    vocabulary = sorted({word for refs in references.values() for ref in refs for word in ref})
    keys = [image for image in references for _ in range(5)]
    samples = [rng.choices(vocabulary, k=rng.randint(0, 10)) for _ in keys]
    corpus_df = defaultdict(float, {("a",): 3.0, ("dog",): 11.0, ("a", "dog"): 2.0, ("red", "bus"): 40.0})

    class FixedDocumentFrequency(CiderScorer):
        def compute_doc_freq(self) -> None:
            self.document_frequency = corpus_df

    scorer = FixedDocumentFrequency(n=4, sigma=6.0)
    for sample, key in zip(samples, keys):
        scorer += (" ".join(sample), [" ".join(ref) for ref in references[key]])
    _, expected = scorer.compute_score()
    # CiderScorer sets ref_len = log(number of (hypothesis, references) pairs) in compute_cider.
    cider = CiderD(dict(corpus_df), ref_len=math.log(len(samples)))
    for key, refs in references.items():
        cider.add_references(key, refs)
    np.testing.assert_allclose(cider.score(samples, keys), expected, rtol=0, atol=1e-9)


def test_eos_as_word_equals_pycocoevalcap_with_appended_token() -> None:
    references, hypotheses = _synthetic(seed=3)
    with_eos = {image: [[*ref, "<eos>"] for ref in refs] for image, refs in references.items()}
    expected_mean, expected = _pycocoevalcap(with_eos, {k: [*v, "<eos>"] for k, v in hypotheses.items()})
    cider = CiderD.from_references(references, eos_as_word=True)
    scores = cider.score([hypotheses[image] for image in references], list(references))
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)
    without = CiderD.from_references(references).score(
        [hypotheses[image] for image in references], list(references)
    )
    assert np.abs(without - scores).max() > 1e-3  # the option really changes the reward
    with pytest.raises(ValueError, match="ends with '<eos>'"):
        cider.score([["a", "dog", "<eos>"]], [3])


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs java")
def test_equals_pycocoevalcap_on_real_coco_files() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ground_truth = json.loads((COCO_DIR / "captions_val2014_fakecap_gt.json").read_text())
    results = json.loads((COCO_DIR / "captions_val2014_fakecap_results.json").read_text())
    gts = {image["id"]: [] for image in ground_truth["images"]}
    for annotation in ground_truth["annotations"]:
        gts[annotation["image_id"]].append({"caption": annotation["caption"]})
    res = {result["image_id"]: [{"caption": result["caption"]}] for result in results}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    expected_mean, expected = Cider().compute_score(gts, res)
    cider = CiderD.from_references({image: [ref.split() for ref in refs] for image, refs in gts.items()})
    scores = cider.score([res[image][0].split() for image in gts], list(gts))
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)
    published = json.loads((COCO_DIR / "expected_scores.json").read_text())
    reproduced = published["reproduced_full_precision_pycocoevalcap_1.2_on_captions_val2014_fakecap_gt.json"]
    assert abs(scores.mean() - reproduced["CIDEr"]) < 1e-9
    assert abs(scores.mean() - published["printed_3dp"]["CIDEr"]) < 5e-4


def test_save_load_roundtrip_and_file_checks(tmp_path: Path) -> None:
    references, hypotheses = _synthetic(seed=5)
    cider = CiderD.from_references(references, eos_as_word=True)
    path = tmp_path / "df.json"
    cider.save(path)
    loaded = CiderD.load(path)
    assert loaded.eos_as_word and loaded.ref_len == cider.ref_len
    assert loaded.document_frequency == cider.document_frequency
    for key, refs in references.items():
        loaded.add_references(key, refs)
    keys = list(references)
    hyps = [hypotheses[key] for key in keys]
    np.testing.assert_array_equal(loaded.score(hyps, keys), cider.score(hyps, keys))
    with pytest.raises(ValueError, match="eos_as_word=True, but eos_as_word=False"):
        CiderD.load(path, eos_as_word=False)
    with pytest.raises(ValueError, match="n=4, but n=5"):
        CiderD.load(path, n=5)
    (tmp_path / "other.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a CIDEr document-frequency file"):
        CiderD.load(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError):
        CiderD.load(tmp_path / "missing.json")


def test_input_errors() -> None:
    cider = CiderD({("a",): 1.0}, ref_len=math.log(2))
    cider.add_references("x", [["a", "dog"]])
    assert "x" in cider and "y" not in cider
    with pytest.raises(ValueError, match="no references for keys"):
        cider.score([["a"]], ["y"])
    with pytest.raises(ValueError, match="1 hypotheses but 2 keys"):
        cider.score([["a"]], ["x", "x"])
    with pytest.raises(ValueError, match="is a string"):
        cider.score(["a dog"], ["x"])
    with pytest.raises(ValueError, match="no reference captions"):
        cider.add_references("z", [])
    with pytest.raises(ValueError, match="ref_len"):
        CiderD({("a",): 1.0})
    assert cider.score([], []).shape == (0,)


def test_build_cider_df_tool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    references, _ = _synthetic(seed=11, num_images=12)
    images = [
        {
            "image_id": key,
            "split": "train" if key % 3 else "val",
            "captions": [" ".join(r) for r in refs],
            "tokens": refs,
        }
        for key, refs in references.items()
    ]
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": images}))
    output = tmp_path / "df.json"
    tool = _load_tool("build_cider_df")
    assert tool.main(["--captions", str(captions), "--split", "train", "--output", str(output)]) == 0
    # Brute force: for each n-gram, the number of train images with it in some reference.
    train = {key: refs for key, refs in references.items() if key % 3}
    expected: dict[str, float] = defaultdict(float)
    for refs in train.values():
        grams = {
            " ".join(ref[i : i + k]) for ref in refs for k in range(1, 5) for i in range(len(ref) - k + 1)
        }
        for gram in grams:
            expected[gram] += 1
    written = json.loads(output.read_text())
    assert written["document_frequency"] == dict(expected)
    assert written["ref_len"] == pytest.approx(math.log(len(train)))
    assert not written["eos_as_word"]
    # An existing output is kept unless --force.
    assert tool.main(["--captions", str(captions), "--split", "train", "--output", str(output)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (
        tool.main(["--captions", str(captions), "--split", "nope", "--output", str(tmp_path / "x.json")]) == 2
    )
    assert not (tmp_path / "x.json").exists()


def test_benchmark_tool_runs(capsys: pytest.CaptureFixture[str]) -> None:
    tool = _load_tool("benchmark_cider")
    assert tool.main(["--images", "4", "--samples", "2", "--repeats", "1"]) == 0
    output = capsys.readouterr().out
    difference = float(output.split("max |CiderD - pycocoevalcap| = ")[1].split()[0])
    assert difference < 1e-9
    assert "x faster" in output
