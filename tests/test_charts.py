"""The custom-scalars charts stay readable: no chart draws more than a dozen lines (a repeated structure is charted
per block, other layers in consecutive groups), and a statistic without data in the run gets no chart."""

from __future__ import annotations

import json
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


def merged_layout(logdir_: Path):
    """The custom-scalars layout TensorBoard's own plugin serves for ``logdir_``: every run's layout, merged."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir_))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir_))
    plugin = CustomScalarsPlugin(base_plugin.TBContext(logdir=str(logdir_), multiplexer=multiplexer,
                                                       data_provider=provider))
    return json.loads(plugin.layout_impl(context.RequestContext(), ""))


def test_runs_of_two_models_in_one_logdir_keep_their_charts_apart(tmp_path: Path) -> None:
    from helpers import MLP, mlp_layers

    root = tmp_path / "tb"
    for version, (model, loader) in enumerate([(Blocks(), make_loader()), (MLP(depth=3), None), (MLP(depth=3), None)]):
        torch.manual_seed(version)
        fit(model, [GradNormMonitor(log_every_n_steps=1, images_every_n_logs=None)], steps=2, loader=loader,
            logger=pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=version))
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1", "version_2"]
    layout = merged_layout(root)
    titles = [category["title"] for category in layout["category"]]
    assert titles == ["gradmon · Blocks, 38 layers", f"gradmon · MLP, {len(mlp_layers(depth=3))} layers"]
    mlp_logged = list(accumulator(root / "version_1").Tags()["scalars"])
    blocks_logged = list(accumulator(root / "version_0").Tags()["scalars"])
    for category, logged, other in zip(layout["category"], (blocks_logged, mlp_logged), (mlp_logged, blocks_logged)):
        regexes = [tag for chart in category["chart"] for tag in chart["multiline"]["tag"]]
        # Each of this model's charts draws some of its run's tags; the other model's layers are in no chart here
        # but the unbanded ones, whose regexes match every model's layers alike.
        assert all(any(re.match(r, t) for t in logged) for r in regexes)
        banded = [r for r in regexes if r.startswith("(?:")]
        assert not any(re.match(r, t) for r in banded for t in other)
    # The two MLP runs wrote the same charts, which TensorBoard shows once.
    mlp_charts = layout["category"][1]["chart"]
    assert len(mlp_charts) == len({c["title"] for c in mlp_charts}) == 5


def test_layers_without_a_repeated_block_are_charted_in_even_groups() -> None:
    logged = [f"grad_norm/net.{2 * i}" for i in range(17)]
    charts = tags.banded_charts({"gradmon": [("gradient norm by layer", r"grad_norm/.*")]}, logged)
    bands = [(title, [t for t in logged if re.match(regex, t)]) for title, regex in charts["gradmon"]]
    assert [(title, len(lines)) for title, lines in bands] == [
        ("gradient norm by layer: net.0 to net.16", 9), ("gradient norm by layer: net.18 to net.32", 8)]
    assert [t for _, lines in bands for t in lines] == logged
