"""Weights & Biases through Lightning's WandbLogger, offline: the per-layer norms as scalars, the histograms as
``wandb.Histogram``, the figures as ``wandb.Image``, the texts (findings, the verdict, WeightInit's records) and
GradHealthMonitor's events as tables, read back from the offline run directory."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
from helpers import MLP, make_loader

from gradmon import ActivationMonitor, GradHealthMonitor, GradNormMonitor, HealthRules, WeightInit, tags

wandb = pytest.importorskip("wandb")


@pytest.mark.slow  # a wandb run, offline
def test_a_wandb_run_holds_the_norms_the_histograms_and_a_table_of_the_findings(tmp_path: Path, monkeypatch) -> None:
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="gradmon-test")
    trainer = pl.Trainer(
        max_steps=4, logger=logger, log_every_n_steps=1, enable_progress_bar=False, enable_checkpointing=False,
        callbacks=[WeightInit("normal(std=0.01)", seed=0, verbose=False),
                   GradNormMonitor(log_every_n_steps=1, histogram_every_n_steps=2, images_every_n_logs=2),
                   GradHealthMonitor(HealthRules(vanishing_threshold=1e3, vanishing_patience=1), on_vanishing="ignore"),
                   ActivationMonitor(log_every_n_steps=2)],
    )
    trainer.fit(MLP(depth=6), make_loader())
    wandb.finish()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    history = next(run.glob("run-*.wandb")).read_bytes()
    assert b"grad_norm/net.0" in history and b"grad_hist/net.0" in history and b"histogram" in history
    media = run / "files" / "media"
    texts = sorted(media.rglob("texts_*.table.json"), key=lambda p: p.stat().st_mtime)
    assert texts and texts[-1].parent.name == tags.WANDB_TEXTS.split("/")[0]
    table = json.loads(texts[-1].read_text())
    assert table["columns"] == ["step", "tag", "text"]
    rows = {row[1]: row for row in table["data"]}
    assert rows["diagnosis/verdict"][0] == 0 and "init scale too small" in rows["diagnosis/verdict"][2]
    assert "diagnosis/forward_decay" in rows and "weight_init/0_normal" in rows
    (events,) = media.rglob("health_events_*.table.json")
    events = json.loads(events.read_text())
    assert events["columns"] == ["step", "layer", "condition", "norm", "rule", "rank"]
    assert {(row[0], row[2]) for row in events["data"]} >= {(0, "vanishing"), (3, "vanishing")}
    # The figures as wandb.Image: every 2nd logging step and at the end.
    images = {p.name.rsplit("_", 2)[0] for p in (media / "images" / "gradmon").glob("*.png")}
    assert images == {"grad_norm_heatmap", "gradient_flow", "activation_rms_heatmap", "dead_or_saturated_heatmap"}
