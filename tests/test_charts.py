"""The custom-scalars charts stay readable: no chart draws more than a dozen lines (a repeated structure is charted
per block, other layers in consecutive groups), and a statistic without data in the run gets no chart."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import accumulator, fit, logdir, make_loader, read_layouts
from torch import nn

from gradmon import ActivationMonitor, GradNormMonitor, tags


class Blocks(pl.LightningModule):
    """12 residual blocks of 4 layers (with GELU: nothing dead, nothing saturated), between an input and a head."""

    def __init__(self, width: int = 16, blocks: int = 12) -> None:
        super().__init__()
        self.stem = nn.Linear(8, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_no_chart_draws_more_than_a_dozen_lines_and_none_is_empty(tmp_path: Path) -> None:
    fit(Blocks(), [GradNormMonitor(log_every_n_steps=1, images_every_n_logs=None),
                   ActivationMonitor(log_every_n_steps=1)], steps=2, tmp_path=tmp_path, loader=make_loader())
    logged = list(accumulator(logdir(tmp_path)).Tags()["scalars"])
    layout = read_layouts(logdir(tmp_path))[-1]
    charts = {chart.title: chart.multiline.tag[0] for category in layout.category for chart in category.chart}
    drawn = {title: [tag for tag in logged if re.match(regex, tag)] for title, regex in charts.items()}
    assert all(0 < len(lines) <= tags.MAX_CHART_LINES for lines in drawn.values()), {
        title: len(lines) for title, lines in drawn.items()}
    # 50 layers: a chart per block, and the stem and head outside them; the blocks' layers stay together.
    assert "gradient norm by layer: blocks.3" in drawn
    assert drawn["gradient norm by layer: blocks.3"] == [f"grad_norm/blocks.3.{i}" for i in (0, 1, 3)]
    assert drawn["gradient norm by layer: stem to head"] == ["grad_norm/stem", "grad_norm/head"]
    every_layer = {t for title, lines in drawn.items() if title.startswith("gradient norm by layer") for t in lines}
    assert every_layer == {t for t in logged if t.startswith("grad_norm/") and not tags.is_total(t.split("/", 1)[1])}
    assert not any(title.startswith(("dead fraction", "saturated fraction")) for title in drawn)  # GELU: no data
