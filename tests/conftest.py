"""Shared fixtures: tiny synthetic worlds and feature files made on the fly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from updown.data.synthetic import SyntheticSpec, ensure_synthetic_world
from updown.data.writers import RegionFeaturesWriter

ROOT = Path(__file__).resolve().parents[1]
# Trimmed copies of real public data (features, annotations, official scores): see tests/data/README.md.
REALDATA = ROOT / "tests" / "data"

# Tests use tiny tensors: one intra-op thread avoids thread contention (several times faster on 2 cores).
torch.set_num_threads(1)

TINY_SPEC = SyntheticSpec(num_train=60, num_val=12, num_test=12, feature_size=32)


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (the tools are scripts, not a package) and register it in ``sys.modules``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small synthetic world (32-d features), generated once per test session."""
    return ensure_synthetic_world(TINY_SPEC, data_root=tmp_path_factory.mktemp("worlds"), progress=False)


def write_features(
    path: Path,
    num_boxes: list[int],
    feature_size: int = 8,
    max_boxes: int = 6,
    seed: int = 0,
    dtype: str = "float32",
) -> dict[int, np.ndarray]:
    """Write a small region-feature file; returns image id -> the features written."""
    rng = np.random.default_rng(seed)
    written = {}
    with RegionFeaturesWriter(path, max_boxes, feature_size, dtype=dtype, force=True) as writer:
        for k, n in enumerate(num_boxes):
            image_id = 100 + 7 * k
            features = rng.random((n, feature_size)).astype(np.float32)
            x1 = rng.uniform(0, 50, size=n)
            y1 = rng.uniform(0, 40, size=n)
            boxes = np.stack([x1, y1, x1 + 10, y1 + 20], axis=1).astype(np.float32)
            writer.add(image_id, features, boxes, image_w=100.0, image_h=80.0)
            written[image_id] = (features, boxes)
    return written


def synthetic_world_args(data_root: Path, spec: SyntheticSpec = TINY_SPEC) -> list[str]:
    """`updown.fit` arguments that point any synthetic datamodule at the world of ``spec`` under ``data_root``."""
    return [
        "--data.init_args.data_root", str(data_root),
        "--data.init_args.synthetic.num_train", str(spec.num_train),
        "--data.init_args.synthetic.num_val", str(spec.num_val),
        "--data.init_args.synthetic.num_test", str(spec.num_test),
        "--data.init_args.synthetic.feature_size", str(spec.feature_size),
    ]  # fmt: skip


def tiny_captioning_args(root: Path, data_root: Path, *extra: str) -> list[str]:
    """`updown.fit` arguments: the synthetic default config, shrunk to the tiny world and a tiny model."""
    return [
        "--config", str(ROOT / "configs" / "captioning" / "synthetic.yaml"),
        "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.net.embedding_size", "16",
        "--model.init_args.net.hidden_size", "32",
        "--model.init_args.net.attention_size", "16",
        *synthetic_world_args(data_root),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_captioning_run(tmp_path_factory, tiny_world):
    """A 2-epoch captioning run on the tiny world; returns its run directory (config, metrics, checkpoints)."""
    from updown.fit import main

    root = tmp_path_factory.mktemp("captioning_run")
    assert main(tiny_captioning_args(root, tiny_world.root.parent)) == 0
    return root / "lightning_logs" / "version_0"
