"""MetricsReport: metrics.json holds the last validation's values, not keys an earlier validation left behind."""

from __future__ import annotations

import json

import pytorch_lightning as pl
import torch

from updown.callbacks import MetricsReport
from updown.tasks.distributed import log_rank_identical


class _Module(pl.LightningModule):
    """Logs ``val/a`` only in the first validation and ``val/b`` in every one (like a metric that is undefined
    in some epochs, e.g. grounding when no caption names an object)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_index):
        return (self.weight - batch).pow(2).mean()

    def validation_step(self, batch, batch_index):
        pass

    def on_validation_epoch_end(self) -> None:
        values = {"val/b": float(self.current_epoch) + 0.5}
        if self.current_epoch == 0:
            values["val/a"] = 1.0
        log_rank_identical(self, values)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_metrics_json_holds_only_the_last_validation(tmp_path):
    data = torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=2)
    trainer = pl.Trainer(
        max_epochs=2,
        default_root_dir=tmp_path,
        callbacks=[MetricsReport()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    trainer.fit(_Module(), train_dataloaders=data, val_dataloaders=data)
    # Lightning still remembers the first epoch's key ...
    assert "val/a" in trainer.callback_metrics
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # ... the report does not.
    assert "val/a" not in metrics
    assert metrics["val/b"] == 1.5 and metrics["epochs"] == 2
