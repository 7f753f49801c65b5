"""`python -m updown.predict captions`: COCO results JSON, per-word attention HDF5, scores."""

from __future__ import annotations

import json

import h5py
import numpy as np

from updown.evaluate import main as evaluate_main
from updown.predict import main
from updown.visualize import caption_attention_figure, load_caption_attention


def test_predicts_the_test_split_in_the_coco_results_format(tmp_path, tiny_captioning_run, tiny_world):
    checkpoint = tiny_captioning_run / "checkpoints" / "last.ckpt"
    output, attention, scores = tmp_path / "results.json", tmp_path / "attention.h5", tmp_path / "scores.json"
    assert main(["captions", "--checkpoint", str(checkpoint), "--split", "test", "--output", str(output),
                 "--attention", str(attention), "--score", str(scores)]) == 0
    results = json.loads(output.read_text())
    references = json.loads((tiny_world.captions_dir / "references_test.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(i["id"] for i in references["images"])
    assert all(isinstance(r["caption"], str) and set(r) == {"image_id", "caption"} for r in results)
    # The scores written with --score equal the official scorer run on the written files (an independent path).
    assert evaluate_main(["captions", "--references", str(tiny_world.captions_dir / "references_test.json"),
                          "--results", str(output), "--output", str(tmp_path / "official.json")]) == 0
    ours, official = json.loads(scores.read_text()), json.loads((tmp_path / "official.json").read_text())
    for key in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert abs(ours[key] - official[key]) < 1e-12
    with h5py.File(attention) as f:
        n, t, r = f["attention"].shape
        assert n == len(results) and f["tokens"].shape == (n, t) and f["boxes"].shape == (n, r, 4)
        lengths, num_boxes, weights = f["lengths"][()], f["num_boxes"][()], f["attention"][()]
        for row in range(n):
            # Each generated word's attention is a distribution over the image's real regions only.
            np.testing.assert_allclose(weights[row, : lengths[row], : num_boxes[row]].sum(axis=1), 1.0, atol=1e-5)
            assert np.all(weights[row, :, num_boxes[row]:] == 0)
        assert [c.decode() if isinstance(c, bytes) else c for c in f["captions"][()]][0] == results[0]["caption"]
    # updown.visualize reads the same file and draws one panel per generated token.
    data = load_caption_attention(attention)
    words = [data["vocabulary"][t] for t in data["tokens"][0, : data["lengths"][0]]]
    figure = caption_attention_figure(words, data["attention"][0], data["boxes"][0, : data["num_boxes"][0]],
                                      image_size=(640, 480))
    assert len(figure.axes) == data["lengths"][0]


def test_bad_checkpoint_and_mismatched_vocabulary(tmp_path, tiny_captioning_run, tiny_world, capsys):
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    assert main(["captions", "--checkpoint", str(tmp_path / "broken.ckpt"), "--output", str(tmp_path / "r.json")]) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    tokens = json.loads((tiny_world.captions_dir / "vocabulary.json").read_text())["tokens"]
    (tmp_path / "other.json").write_text(json.dumps({"tokens": tokens[:-1] + ["zebra"]}))
    code = main(["captions", "--checkpoint", str(tiny_captioning_run / "checkpoints" / "last.ckpt"),
                 "--features", str(tiny_world.features_h5path), "--captions", str(tiny_world.captions_dir / "captions.json"),
                 "--vocabulary", str(tmp_path / "other.json"), "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "Vocabulary mismatch" in err and "other.json" in err and "zebra" in err
    assert not (tmp_path / "r.json").exists()
