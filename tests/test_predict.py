"""`python -m updown.predict captions`: COCO results JSON, per-word attention HDF5, scores."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT

from updown.data.datamodules import CaptioningDataModule, datamodule_from_checkpoint
from updown.evaluate import main as evaluate_main
from updown.predict import main
from updown.prediction import CaptionWriter
from updown.tasks.captioning import CaptioningTask
from updown.visualize import caption_attention_figure, load_caption_attention


def test_predicts_the_test_split_in_the_coco_results_format(tmp_path, tiny_captioning_run, tiny_world):
    checkpoint = tiny_captioning_run / "checkpoints" / "last.ckpt"
    output, attention, scores = tmp_path / "results.json", tmp_path / "attention.h5", tmp_path / "scores.json"
    assert (
        main(
            [
                "captions",
                "--checkpoint",
                str(checkpoint),
                "--split",
                "test",
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
    references = json.loads((tiny_world.captions_dir / "references_test.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(i["id"] for i in references["images"])
    assert all(isinstance(r["caption"], str) and set(r) == {"image_id", "caption"} for r in results)
    # The scores written with --score equal the official scorer run on the written files (an independent path).
    assert (
        evaluate_main(
            [
                "captions",
                "--references",
                str(tiny_world.captions_dir / "references_test.json"),
                "--results",
                str(output),
                "--output",
                str(tmp_path / "official.json"),
            ]
        )
        == 0
    )
    ours, official = json.loads(scores.read_text()), json.loads((tmp_path / "official.json").read_text())
    for key in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert abs(ours[key] - official[key]) < 1e-12
    with h5py.File(attention) as f:
        n, t, r = f["attention"].shape
        assert n == len(results) and f["tokens"].shape == (n, t) and f["boxes"].shape == (n, r, 4)
        lengths, num_boxes, weights = f["lengths"][()], f["num_boxes"][()], f["attention"][()]
        for row in range(n):
            # Each generated word's attention is a distribution over the image's real regions only.
            np.testing.assert_allclose(
                weights[row, : lengths[row], : num_boxes[row]].sum(axis=1), 1.0, atol=1e-5
            )
            assert np.all(weights[row, :, num_boxes[row] :] == 0)
        assert [c.decode() if isinstance(c, bytes) else c for c in f["captions"][()]][0] == results[0][
            "caption"
        ]
    # updown.visualize reads the same file and draws one panel per generated token.
    data = load_caption_attention(attention)
    words = [data["vocabulary"][t] for t in data["tokens"][0, : data["lengths"][0]]]
    figure = caption_attention_figure(
        words, data["attention"][0], data["boxes"][0, : data["num_boxes"][0]], image_size=(640, 480)
    )
    assert len(figure.axes) == data["lengths"][0]


def test_bad_checkpoint_and_mismatched_vocabulary(tmp_path, tiny_captioning_run, tiny_world, capsys):
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    assert (
        main(
            ["captions", "--checkpoint", str(tmp_path / "broken.ckpt"), "--output", str(tmp_path / "r.json")]
        )
        == 2
    )
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    tokens = json.loads((tiny_world.captions_dir / "vocabulary.json").read_text())["tokens"]
    (tmp_path / "other.json").write_text(json.dumps({"tokens": tokens[:-1] + ["zebra"]}))
    code = main(
        [
            "captions",
            "--checkpoint",
            str(tiny_captioning_run / "checkpoints" / "last.ckpt"),
            "--features",
            str(tiny_world.features_h5path),
            "--captions",
            str(tiny_world.captions_dir / "captions.json"),
            "--vocabulary",
            str(tmp_path / "other.json"),
            "--output",
            str(tmp_path / "r.json"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Vocabulary mismatch" in err and "other.json" in err and "zebra" in err
    assert not (tmp_path / "r.json").exists()


def test_prediction_runs_predict_step_through_trainer_predict(tmp_path, tiny_captioning_run, monkeypatch):
    """`updown.predict` decodes with the task's predict_step under Trainer.predict; --beam-size reaches it; the
    captions equal a plain Trainer.predict of the same checkpoint and a direct beam search of each batch."""
    checkpoint = tiny_captioning_run / "checkpoints" / "last.ckpt"
    calls = []
    original = CaptioningTask.predict_step

    def recorded(task, batch, batch_index):
        calls.append((batch_index, task.decoding.beam_size, task.trainer.predicting))
        return original(task, batch, batch_index)

    monkeypatch.setattr(CaptioningTask, "predict_step", recorded)
    output = tmp_path / "results.json"
    assert main(["captions", "--checkpoint", str(checkpoint), "--output", str(output), "--beam-size", "1",
                 "--batch-size", "5", "--device", "cpu"]) == 0
    monkeypatch.undo()
    results = json.loads(output.read_text())
    assert calls == [(index, 1, True) for index in range(math.ceil(len(results) / 5))]

    task = CaptioningTask.load_from_checkpoint(checkpoint, map_location="cpu")
    task.decoding = task.decoding.replace(beam_size=1)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    datamodule = datamodule_from_checkpoint(CaptioningDataModule, saved, eval_batch_size=5)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    predictions = trainer.predict(task, datamodule=datamodule)
    expected = [{"image_id": i, "caption": c} for p in predictions for i, c in zip(p["image_id"], p["caption"])]
    assert results == expected
    direct = []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            captions = task.captions_of(task.decode(batch, beam_size=1).tokens)
            direct += [{"image_id": i, "caption": c} for i, c in zip(batch["image_id"].tolist(), captions)]
    assert results == direct


def test_a_failed_prediction_keeps_existing_files(tmp_path, tiny_captioning_run, tiny_world, capsys, monkeypatch):
    """With --force, existing outputs are replaced only by complete new ones: an error while decoding (a NaN
    in the last image's features) or while writing the attention file leaves both files as they were."""
    checkpoint = tiny_captioning_run / "checkpoints" / "last.ckpt"
    output, attention = tmp_path / "results.json", tmp_path / "attention.h5"
    output.write_text("keep")
    attention.write_text("keep")
    good = main(["captions", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "good.json"), "--device", "cpu"])
    assert good == 0
    last_image = json.loads((tmp_path / "good.json").read_text())[-1]["image_id"]
    features = tmp_path / "features.h5"
    shutil.copy(tiny_world.features_h5path, features)
    with h5py.File(features, "r+") as f:
        row = list(f["image_id"][()]).index(last_image)
        f["features"][row, 0, 0] = np.nan
    args = ["captions", "--checkpoint", str(checkpoint), "--features", str(features),
            "--captions", str(tiny_world.captions_dir / "captions.json"),
            "--vocabulary", str(tiny_world.captions_dir / "vocabulary.json"),
            "--output", str(output), "--attention", str(attention), "--batch-size", "5", "--device", "cpu", "--force"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " error: " in line]
    assert len(errors) == 1 and f"contains NaN or inf for image {last_image}" in errors[0], err
    assert "Traceback" not in err
    assert output.read_text() == "keep" and attention.read_text() == "keep"
    assert not list(tmp_path.glob(".*.tmp"))

    def broken(writer, path):
        raise OSError("disk full")

    monkeypatch.setattr(CaptionWriter, "write_attention", broken)
    args[args.index("--features") + 1] = str(tiny_world.features_h5path)
    with pytest.raises(OSError, match="disk full"):
        main(args)
    assert output.read_text() == "keep" and attention.read_text() == "keep"
    assert not list(tmp_path.glob(".*.tmp"))


def test_writer_keeps_one_record_per_image_in_dataset_order(tmp_path, monkeypatch):
    """What rank 0 does under DDP: the ranks' records gathered (here, faked), repeats dropped, dataset order."""
    writer = CaptionWriter(str(tmp_path / "results.json"), ["<pad>", "a"], attention=str(tmp_path / "att.h5"))
    rank_batches = [  # DistributedSampler order: rank 0 has indices 0, 2, 4; rank 1 has 1, 3 and 0 again
        [([0, 2], [10, 12]), ([4], [14])],
        [([1, 3], [11, 13]), ([0], [10])],
    ]
    ranks = []
    for batches in rank_batches:
        writer.on_predict_epoch_start(None, None)
        for indices, image_ids in batches:
            n = len(image_ids)
            boxes = 100 * torch.tensor(image_ids, dtype=torch.float32).view(n, 1, 1).expand(n, 2, 4)
            prediction = {
                "image_id": image_ids, "caption": [f"caption {i}" for i in image_ids],
                "tokens": torch.ones(n, 3, dtype=torch.long), "lengths": torch.full((n,), 2),
                "attention": torch.full((n, 3, 2), 0.5), "num_boxes": torch.full((n,), 2), "boxes": boxes,
            }  # fmt: skip
            writer.write_on_batch_end(None, None, prediction, indices, None, 0)
        ranks.append(writer._records)
    monkeypatch.setattr("updown.prediction.gather_outputs", lambda records: [r for rank in ranks for r in rank])
    writer._records = ranks[0]
    writer.on_predict_epoch_end(SimpleNamespace(is_global_zero=True), None)
    assert json.loads((tmp_path / "results.json").read_text()) == [
        {"image_id": i, "caption": f"caption {i}"} for i in (10, 11, 12, 13, 14)
    ]
    with h5py.File(tmp_path / "att.h5") as f:
        assert f["image_id"][()].tolist() == [10, 11, 12, 13, 14]
        assert f["boxes"][()][:, 0, 0].tolist() == [1000, 1100, 1200, 1300, 1400]


def test_ddp_prediction_writes_the_single_process_files(tmp_path, tiny_captioning_run):
    """`--device cpu --devices 2` (DDP, gloo): two processes decode halves of the split, rank 0 writes one file
    per output, equal to a single process's (attention to float rounding: the batches are padded differently)."""
    checkpoint = tiny_captioning_run / "checkpoints" / "last.ckpt"
    written = {}
    for name, extra in (("single", []), ("ddp", ["--devices", "2"])):
        command = [sys.executable, "-m", "updown.predict", "captions", "--checkpoint", str(checkpoint),
                   "--output", str(tmp_path / f"{name}.json"), "--attention", str(tmp_path / f"{name}.h5"),
                   "--batch-size", "5", "--device", "cpu", *extra]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        # Rank 0 alone reports.
        assert done.stderr.count("captions of split 'test'") == 1, done.stderr
        with h5py.File(tmp_path / f"{name}.h5") as f:
            written[name] = (tmp_path / f"{name}.json").read_text(), {key: f[key][()] for key in f}
    assert written["ddp"][0] == written["single"][0]
    single, ddp = written["single"][1], written["ddp"][1]
    assert sorted(single) == sorted(ddp)
    for key in single:
        if key == "attention":
            np.testing.assert_allclose(ddp[key], single[key], atol=1e-6)
        else:
            np.testing.assert_array_equal(ddp[key], single[key], err_msg=key)
