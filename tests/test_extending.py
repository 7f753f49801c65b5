"""docs/extending.md, checked: its worked example (tests/extending_example.py, a multi-label tagging task written on
the base classes in under 100 lines) trains on the tiny synthetic world, runs from the page's YAML through
`python -m updown.fit`, rebuilds its model from a checkpoint alone, and every other code block of the page runs or
applies."""

from __future__ import annotations

import ast
import json
import re
import sys
import types
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT, TINY_SPEC, synthetic_world_args
from extending_example import TaggerConfig, TaggingDataModule, TaggingTask

from updown.fit import main
from updown.tasks.optim import OptimizerConfig

EXAMPLE = Path(__file__).with_name("extending_example.py")
DOC = ROOT / "docs" / "extending.md"


def code_lines(source: str) -> int:
    """Lines of code as cloc counts them: not blank, not a comment, not part of a docstring."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and body:
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    return sum(
        1
        for number, line in enumerate(source.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#") and number not in docstrings
    )


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)


def apply_diff(text: str, diff: str) -> str:
    """``text`` with the hunks of ``diff`` applied in order (hunk headers carry no line numbers); each hunk's
    context and removed lines must appear in ``text`` as they are."""
    for hunk in re.split(r"^@@.*\n", diff, flags=re.M)[1:]:
        lines = hunk.splitlines(keepends=True)
        old = "".join(line[1:] for line in lines if line[:1] in " -")
        new = "".join(line[1:] for line in lines if line[:1] in " +")
        assert old in text, f"this hunk of docs/extending.md no longer applies:\n{hunk}"
        text = text.replace(old, new, 1)
    return text


# Three lines of code: a docstring, a comment line and blank lines are not code.
COUNTING_SAMPLE = '''"""Doc."""

x = 1  # one
# none
def f():
    """Doc
    string."""
    return x
'''


def tiny_datamodule(tiny_world, **kwargs) -> TaggingDataModule:
    return TaggingDataModule(data_root=str(tiny_world.root.parent), synthetic=TINY_SPEC, **kwargs)


def test_the_example_is_under_100_lines_of_code():
    assert code_lines(EXAMPLE.read_text()) < 100
    assert code_lines(COUNTING_SAMPLE) == 3


def test_the_example_learns_to_tag_the_images_it_trains_on(tiny_world, tmp_path):
    pl.seed_everything(0)
    # Validation on the training images: the tiny world's 12 validation images make a noisy score.
    datamodule = tiny_datamodule(tiny_world, batch_size=10, val_split="train")
    datamodule.setup("fit")
    task = TaggingTask(TaggerConfig(attention_size=16), OptimizerConfig("adam", 1e-2))
    task.setup_model(datamodule.data_spec())  # built before fitting, to measure the untrained loss
    dataset = datamodule.train_dataset()
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    targets = batch["category_targets"]

    def loss(logits: torch.Tensor | None = None) -> float:
        if logits is None:
            with torch.no_grad():
                logits = task.model(batch["image_features"], batch["image_features_mask"])
        return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, targets))

    before = loss()
    # The best a tagger blind to the image can do: each category's frequency, for every image.
    blind = loss(targets.mean(dim=0).logit().expand_as(targets))
    trainer = pl.Trainer(
        max_epochs=10, accelerator="cpu", default_root_dir=tmp_path, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(task, datamodule=datamodule)
    assert loss() < blind < before  # measured: 0.42-0.45 < 0.51 < 0.69 over seeds 0-4
    # Random scores get about each category's frequency as average precision: 0.22 on average here (0.26 averaged
    # over 200 random draws, 0.33 at most).
    chance = float(targets.mean())
    assert float(trainer.callback_metrics["val/map"]) > 2 * chance  # measured: 0.66-0.68
    assert task.validation_num_samples == len(dataset) == TINY_SPEC.num_train


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory, tiny_world) -> Path:
    """The page's YAML through `updown.fit.main`, shrunk to 2 epochs of the tiny world; returns the run directory."""
    root = tmp_path_factory.mktemp("tagging_run")
    (config,) = doc_blocks("yaml")
    (root / "tagging.yaml").write_text(config)
    args = [
        "--config", str(root / "tagging.yaml"),
        "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.net.attention_size", "16",
        *synthetic_world_args(tiny_world.root.parent),
    ]  # fmt: skip
    assert main(args) == 0
    return root / "lightning_logs" / "version_0"


def test_the_doc_config_trains_through_updown_fit(doc_run, tiny_world):
    metrics = json.loads((doc_run / "metrics.json").read_text())
    assert 0.0 < metrics["val/map"] <= 1.0 and 0.0 < metrics["best/val/map"] <= 1.0
    assert metrics["global_step"] == 2 * 2  # 60 images, 32 per batch, 2 epochs
    checkpoint = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=False)
    names = tiny_datamodule(tiny_world).open_features().region_category_names
    assert checkpoint["data_spec"]["vocabularies"] == {"category": names}
    assert checkpoint["hyper_parameters"]["net"]["attention_size"] == 16


def test_a_checkpoint_rebuilds_its_model_without_the_data(doc_run, tiny_world):
    metrics = json.loads((doc_run / "metrics.json").read_text())
    task = TaggingTask.load_from_checkpoint(metrics["best_checkpoint"], map_location="cpu")
    assert task.net_config == TaggerConfig(attention_size=16) and task.model.queries.shape == (12, 16)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (scores,) = trainer.validate(task, datamodule=tiny_datamodule(tiny_world), verbose=False)
    assert scores["val/map"] == pytest.approx(metrics["best/val/map"], abs=1e-6)


def test_a_choice_not_listed_is_refused_when_parsed(tmp_path, tiny_world, capsys):
    config = tmp_path / "tagging.yaml"
    config.write_text(doc_blocks("yaml")[0])
    assert main(["--config", str(config), "--model.init_args.net.feature_encoder", "sse", "--print_config"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--model.init_args.net.feature_encoder" in errors[0] and "'sse'" in errors[0]


def test_every_python_block_of_the_doc_is_the_example_or_runs():
    example = EXAMPLE.read_text()
    blocks = doc_blocks("python")
    assert sum(block in example for block in blocks) == 4  # imports, model, data, task
    for block in blocks:
        if block not in example:
            exec(compile(block, str(DOC), "exec"), {"__name__": "extending_doc"})


def test_the_doc_diffs_apply_and_the_new_option_works(monkeypatch):
    diffs = {re.search(r"^\+\+\+ b/(\S+)", diff, flags=re.M).group(1): diff for diff in doc_blocks("diff")}
    assert sorted(diffs) == ["tests/extending_example.py", "updown/config.py", "updown/modules/blocks.py"]
    for path, diff in diffs.items():
        apply_diff((ROOT / path).read_text(), diff)
    # The option: load the patched example as a module and use `pooling`.
    module = types.ModuleType("extending_example_with_pooling")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    patched = apply_diff(EXAMPLE.read_text(), diffs["tests/extending_example.py"])
    exec(compile(patched, module.__name__, "exec"), module.__dict__)
    with pytest.raises(ValueError, match="pick one of them"):
        module.TaggerConfig(pooling="max")
    assert module.TaggerConfig.coerce({"attention_size": 8}).pooling == "attention"  # an older checkpoint's
    model = module.RegionTagger(6, 3, module.TaggerConfig(pooling="mean"))
    features, mask = torch.randn(2, 4, 6), torch.tensor([[True] * 4, [True] * 2 + [False] * 2])
    mean = torch.stack([features[0].mean(dim=0), features[1, :2].mean(dim=0)])
    torch.testing.assert_close(model(features, mask), model.classifier(mean))
