"""The data tools end to end: make_synthetic -> convert_features (TSV path) and prepare_captions."""

from __future__ import annotations

import numpy as np
from conftest import load_tool

from updown.data.readers import RegionFeatures


def test_synthetic_tsv_converts_to_the_same_features(tmp_path):
    world = tmp_path / "world"
    make = [
        "--output",
        str(world),
        "--num-train",
        "6",
        "--num-val",
        "2",
        "--num-test",
        "2",
        "--feature-size",
        "16",
    ]
    assert load_tool("make_synthetic").main([*make, "--tsv"]) == 0
    assert (
        load_tool("convert_features").main(
            ["--input", str(world / "raw" / "features.tsv"), "--output", str(tmp_path / "c.h5"), "--quiet"]
        )
        == 0
    )
    original, converted = RegionFeatures(world / "features.h5"), RegionFeatures(tmp_path / "c.h5")
    assert original.image_ids == converted.image_ids
    for image_id in original.image_ids:
        np.testing.assert_array_equal(original[image_id].features, converted[image_id].features)
        np.testing.assert_array_equal(original[image_id].boxes, converted[image_id].boxes)
    # A second run into the same non-empty folder is refused.
    assert load_tool("make_synthetic").main(make) == 2


def test_prepare_captions_cli(tmp_path, capsys):
    tool = load_tool("prepare_captions")
    assert (
        load_tool("make_synthetic").main(
            [
                "--output",
                str(tmp_path / "w"),
                "--num-train",
                "20",
                "--feature-size",
                "8",
                "--num-val",
                "3",
                "--num-test",
                "3",
            ]
        )
        == 0
    )
    args = [
        "--karpathy",
        str(tmp_path / "w" / "raw" / "dataset_coco.json"),
        "--output",
        str(tmp_path / "out"),
    ]
    assert tool.main(args) == 0
    for name in ("captions.json", "vocabulary.json", "references_val.json", "references_test.json"):
        assert (tmp_path / "out" / name).exists()
    before = (tmp_path / "out" / "captions.json").read_bytes()
    assert tool.main(args) == 2 and "Pass --force" in capsys.readouterr().err
    assert (tmp_path / "out" / "captions.json").read_bytes() == before
    (tmp_path / "bad.json").write_text("{")
    assert tool.main(["--karpathy", str(tmp_path / "bad.json"), "--output", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "bad.json: Karpathy dataset JSON is not valid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "o2").exists()
