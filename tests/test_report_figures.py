"""The report's figures stay readable from 1 to 200 layers and from 1 to 100,000 steps: drawn from generated event
files, they raise no matplotlib warning, keep every label inside the figure and apart from its neighbours, put
steps on whole numbers, and mark where GradHealthMonitor flagged."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from gradmon.report import (
    ACTIVATION_HEATMAPS,
    MAX_HEATMAP_COLUMNS,
    MAX_LABEL_CHARS,
    Run,
    load_runs,
    plot_activation_heatmap,
    plot_flow_comparison,
    plot_gradient_flow,
    plot_heatmap,
    plot_norm_curves,
    short_names,
)
from gradmon.tensorboard import write_scalars

MAX_LEGEND_ENTRIES = 12
MAX_HEIGHT_INCHES = 14.0


def transformer_layers(blocks: int) -> list[str]:
    """Layer names as Lightning's demo Transformer (nn.Transformer) has them, ``blocks`` per stack."""
    names = ["model.embedding"]
    for stack in ("encoder", "decoder"):
        extra = ["multihead_attn", "multihead_attn.out_proj"] if stack == "decoder" else []
        pieces = ["self_attn", "self_attn.out_proj", *extra, "linear1", "linear2", "norm1", "norm2"]
        names += [f"model.transformer.{stack}.layers.{b}.{p}" for b in range(blocks) for p in pieces]
        names.append(f"model.transformer.{stack}.norm")
    return names + ["model.decoder"]


def write(path: Path, layers: list[str], steps, flag: Callable[[str, int], int] | None = None, seed: int = 0) -> None:
    """Gradient norms falling 9 decades from the output back to the input; ``grad_health/vanishing`` counts the
    layers below 1e-7 from step 10 on; with ``flag``, ``grad_health_flag/<layer>`` where it is non-zero."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(-9.0, 0.0, len(layers))
    with SummaryWriter(str(path)) as writer:
        for step in steps:
            logs = depth + 0.2 * rng.standard_normal(len(layers))
            values = {f"grad_norm/{layer}": 10.0**v for layer, v in zip(layers, logs)}
            values.update({f"grad_norm_log10/{layer}": v for layer, v in zip(layers, logs)})
            vanishing = int((logs < -7).sum()) if step >= 10 else 0
            values.update({"grad_health/vanishing": vanishing, "grad_health/exploding": 0, "grad_health/nonfinite": 0})
            for layer in layers if flag else ():
                if code := flag(layer, step):
                    values[f"grad_health_flag/{layer}"] = code
            write_scalars(writer, values, step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    logdir = tmp_path_factory.mktemp("runs")
    write(logdir / "wide", transformer_layers(14)[:200], range(0, 250, 5))  # 200 layers, 50 logged steps
    write(logdir / "one_step", ["net.0", "net.2", "net.4"], [0])
    write(logdir / "long", ["encoder.conv1", "encoder.conv2", "decoder.fc1", "decoder.fc2"], range(0, 100_001, 100))
    flagged = [f"net.{2 * i}" for i in range(12)]
    write(
        logdir / "flagged", flagged, range(20),
        # net.0 vanishing from step 10, net.10 exploding at 5 and 6, net.22 non-finite at 7.
        lambda layer, step: 1 * (layer == "net.0" and step >= 10) + 2 * (layer == "net.10" and step in (5, 6))
        + 3 * (layer == "net.22" and step == 7),
    )
    return {run.name: run for run in load_runs(logdir)}


def draw(plot: Callable[..., Figure], *args) -> Figure:
    """Build and draw a figure with every warning an error ("constrained_layout not applied", log-scaling nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot(*args)
        canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
        canvas.draw()
    return fig


def visible_tick_labels(axis) -> list:
    """The tick labels matplotlib draws: visible, not empty, within the view (compared on the axis' own scale)."""
    scale = axis.get_transform()
    low, high = sorted(scale.transform(np.array(axis.get_view_interval(), dtype=float)))
    index = 0 if axis.axis_name == "x" else 1
    return [
        label for label in axis.get_ticklabels()
        if label.get_visible() and label.get_text()
        and low - 1e-9 <= scale.transform([float(label.get_position()[index])])[0] <= high + 1e-9
    ]


def assert_readable(fig: Figure) -> None:
    """Every label inside the figure, and no two tick labels of one axis on top of each other."""
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    texts = [t for t in fig.texts if t.get_text()]
    for ax in fig.axes:
        texts += [ax.xaxis.label, ax.yaxis.label, ax.title]
        legend = ax.get_legend()
        if legend is not None:
            texts += [*legend.get_texts(), legend.get_title()]
        for axis in (ax.xaxis, ax.yaxis):
            labels = visible_tick_labels(axis)
            texts += labels
            extents = sorted((t.get_window_extent(renderer) for t in labels), key=lambda e: (e.x0, e.y0))
            for a, b in zip(extents, extents[1:]):
                assert not a.overlaps(b), (ax.get_title(), axis.axis_name, a, b)
    for text in texts:
        if not text.get_text() or not text.get_visible():
            continue
        extent = text.get_window_extent(renderer)
        inside = box.x0 - 0.5 <= extent.x0 and extent.x1 <= box.x1 + 0.5
        inside = inside and box.y0 - 0.5 <= extent.y0 and extent.y1 <= box.y1 + 0.5
        assert inside, (text.get_text(), extent, box)
    assert fig.get_size_inches()[1] <= MAX_HEIGHT_INCHES


def step_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_xlabel() == "step"]


def assert_integer_steps(fig: Figure) -> list[int]:
    ax = step_axes(fig)[0]
    labels = visible_tick_labels(ax.xaxis)
    assert labels
    for label in labels:
        assert label.get_text() == str(int(label.get_text())), label.get_text()  # "20000", not "2e4" nor "2.5"
        assert label.get_position()[0] == int(label.get_text())
    assert ax.xaxis.get_offset_text().get_text() == ""
    return [int(label.get_text()) for label in labels]


def legend_entries(fig: Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


@pytest.mark.slow  # 200 layers drawn three ways
@pytest.mark.parametrize("plot", [plot_heatmap, plot_norm_curves, plot_gradient_flow])
def test_200_layers_with_long_names_stay_readable(runs, plot):
    fig = draw(plot, runs["wide"])
    assert_readable(fig)
    assert len(legend_entries(fig)) <= MAX_LEGEND_ENTRIES
    caption = "\n".join(t.get_text() for t in fig.texts)
    assert 'common prefix "model."' in caption
    for ax in fig.axes:
        for label in visible_tick_labels(ax.yaxis if plot is plot_heatmap else ax.xaxis):
            assert len(label.get_text()) <= MAX_LABEL_CHARS
    if plot is not plot_gradient_flow:
        assert_integer_steps(fig)
    if plot is plot_heatmap:
        (heatmap,) = step_axes(fig)
        shown = [t.get_text() for t in visible_tick_labels(heatmap.yaxis)]
        assert 20 <= len(shown) < 200  # thinned, not dropped
        assert shown[0] == "embedding" and "labelled" in caption
        assert fig.get_size_inches()[1] == pytest.approx(MAX_HEIGHT_INCHES, abs=0.6)  # grown to the cap
    if plot is plot_norm_curves:
        entries = legend_entries(fig)
        assert "range, all 200 layers" in entries and "median" in entries
        assert any(e.endswith("(input)") for e in entries) and any(e.endswith("(largest median)") for e in entries)


@pytest.mark.parametrize("plot", [plot_heatmap, plot_norm_curves, plot_gradient_flow])
def test_a_one_step_run_has_its_step_as_the_only_tick(runs, plot):
    fig = draw(plot, runs["one_step"])
    assert_readable(fig)
    if plot is plot_gradient_flow:
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "2", "4"]
        return
    assert assert_integer_steps(fig) == [0]
    (ax,) = step_axes(fig)
    assert ax.get_xlim() == (-0.5, 0.5)
    if plot is plot_norm_curves:  # one point per layer: a line of one point draws nothing, a marker does
        assert all(line.get_marker() == "o" for line in ax.get_lines())
    if plot is plot_heatmap:
        assert "flagged nothing" in "\n".join(t.get_text() for t in fig.texts)


@pytest.mark.parametrize("plot", [plot_heatmap, plot_norm_curves])
def test_100000_steps_get_whole_step_ticks_and_a_heatmap_of_at_most_1000_columns(runs, plot):
    fig = draw(plot, runs["long"])
    assert_readable(fig)
    ticks = assert_integer_steps(fig)
    assert ticks[-1] >= 50_000 and len(ticks) <= 12
    if plot is plot_heatmap:
        (ax,) = step_axes(fig)
        assert ax.collections[0].get_array().shape[1] <= MAX_HEATMAP_COLUMNS
        assert "mean of up to 2 consecutive logged steps" in "\n".join(t.get_text() for t in fig.texts)


def test_flagged_steps_are_marked_above_the_heatmap_and_the_curves_from_the_counts(runs):
    for plot in (plot_heatmap, plot_norm_curves):
        fig = draw(plot, runs["long"])
        (strip,) = [ax for ax in fig.axes if ax.get_title(loc="left") == "steps GradHealthMonitor flagged"]
        (vanishing,) = [c for c in strip.collections if c.get_gid() == "flagged-steps-vanishing"]
        assert sorted(vanishing.get_positions()) == list(range(100, 100_001, 100))
        assert not [c for ax in fig.axes for c in ax.collections if (c.get_gid() or "").startswith("layer-flags")]
        assert "no grad_health_flag/ tags" in "\n".join(t.get_text() for t in fig.texts)


def test_per_layer_flags_hatch_the_heatmap_cells_and_mark_the_curves(runs):
    fig = draw(plot_heatmap, runs["flagged"])
    assert_readable(fig)
    (ax,) = step_axes(fig)
    cells = {}
    for collection in ax.collections:
        if isinstance(collection, PatchCollection):
            boxes = [path.get_extents() for path in collection.get_paths()]
            cells[collection.get_gid()] = [(b.x0, b.x1, b.y0, b.y1) for b in boxes]
    # Rows: net.0 is row 0, net.10 row 5, net.22 row 11; cells span half a step either side of their step.
    assert cells == {
        "layer-flags-vanishing": [(9.5, 19.5, 0.0, 1.0)],
        "layer-flags-exploding": [(4.5, 6.5, 5.0, 6.0)],
        "layer-flags-nonfinite": [(6.5, 7.5, 11.0, 12.0)],
    }

    curves = draw(plot_norm_curves, runs["flagged"])
    assert_readable(curves)
    entries = legend_entries(curves)
    assert len(entries) <= MAX_LEGEND_ENTRIES
    assert {"flagged vanishing", "flagged exploding", "flagged non-finite"} <= set(entries)
    assert "10 (most flagged)" in entries  # net.10 is drawn because it was flagged
    marked = {c.get_gid(): c.get_offsets()[:, 0].tolist() for c in curves.axes[-2].collections if c.get_gid()}
    assert marked["layer-flags-vanishing"] == list(range(10, 20))
    assert marked["layer-flags-exploding"] == [5, 6]


def test_the_comparison_draws_runs_of_different_layers_on_their_union(runs):
    fig = draw(plot_flow_comparison, [runs["one_step"], runs["flagged"]], "both")
    assert_readable(fig)
    (ax,) = fig.axes
    assert [t.get_text() for t in visible_tick_labels(ax.xaxis)][:3] == ["0", "2", "4"]
    assert [len(line.get_xdata()) for line in ax.get_lines()] == [12, 12]


def test_short_names_drop_the_common_prefix_and_abbreviate_middle_pieces():
    names = transformer_layers(2)
    short = short_names(names)
    assert short.prefix == "model."
    assert len(set(short.labels)) == len(names)
    assert all(len(label) <= MAX_LABEL_CHARS for label in short.labels)
    label = dict(zip(names, short.labels))
    assert label["model.transformer.encoder.layers.1.self_attn.out_proj"] == "t.e.l.1.self_attn.out_proj"
    assert label["model.embedding"] == "embedding"
    assert label["model.transformer.decoder.layers.0.multihead_attn.out_proj"] == "t.d.l.0.ma.out_proj"
    abbreviations = {"t": "transformer", "e": "encoder", "l": "layers", "d": "decoder", "ma": "multihead_attn"}
    assert short.abbreviations == abbreviations
    assert short.caption() == [
        'Layer names without their common prefix "model.".',
        "Abbreviated: t = transformer, e = encoder, l = layers, d = decoder, ma = multihead_attn.",
    ]


@pytest.mark.parametrize(
    ("names", "labels", "prefix"),
    [
        (["net.0", "net.2", "net.10"], ["0", "2", "10"], "net."),
        (["fc"], ["fc"], ""),
        (["model.backbone.fc"], ["fc"], "model.backbone."),
        (["a", "b.c"], ["a", "b.c"], ""),
        # Two pieces abbreviating alike get more letters: "embedding" and "encoder" are not both "e".
        (
            ["embedding_stack.layers.0.attention", "encoder_stack.layers.0.attention"],
            ["em_st.layers.0.attention", "en_st.layers.0.attention"],
            "",
        ),
        (["x" * 60], ["x" * 9 + "…" + "x" * 18], ""),  # one piece too long: its start and end kept
    ],
)
def test_short_names_cases(names, labels, prefix):
    short = short_names(names)
    assert (short.labels, short.prefix) == (labels, prefix)


def write_activations(path: Path, modules: list[str], steps) -> None:
    """What ActivationMonitor logs: the forward signal falling 6 decades through depth, the backward signal rising,
    dead fractions for every other module and saturated fractions and slopes for the others."""
    rng = np.random.default_rng(0)
    depth = np.linspace(0.0, -6.0, len(modules))
    with SummaryWriter(str(path)) as writer:
        for step in steps:
            logs = depth + 0.1 * rng.standard_normal(len(modules))
            values = {}
            for i, (module, v) in enumerate(zip(modules, logs)):
                values.update({f"activation_rms/{module}": 10.0**v, f"activation_rms_log10/{module}": v,
                               f"activation_grad_rms/{module}": 10.0 ** (v - 3), f"activation_grad_rms_log10/{module}":
                               v - 3})
                fraction = float(rng.uniform())
                metrics = ("dead_fraction",) if i % 2 else ("saturated_fraction", "activation_slope")
                values.update({f"{metric}/{module}": fraction for metric in metrics})
            write_scalars(writer, values, step)


@pytest.fixture(scope="module")
def activation_runs(tmp_path_factory) -> dict[str, Run]:
    logdir = tmp_path_factory.mktemp("activation_runs")
    write_activations(logdir / "wide", transformer_layers(14)[:200], range(0, 250, 5))
    write_activations(logdir / "long", ["encoder.conv1", "encoder.act1", "decoder.fc1", "decoder.act2"],
                      range(0, 100_001, 100))
    write_activations(logdir / "one_step", ["net.0", "net.1", "net.2", "net.3"], [0])
    return {run.name: run for run in load_runs(logdir)}


@pytest.mark.slow  # every activation heatmap of three runs
@pytest.mark.parametrize("figure", list(ACTIVATION_HEATMAPS))
@pytest.mark.parametrize("name", ["wide", "long", "one_step"])
def test_activation_heatmaps_keep_the_heatmaps_readability(activation_runs, name, figure):
    fig = draw(plot_activation_heatmap, activation_runs[name], figure)
    assert_readable(fig)
    ticks = assert_integer_steps(fig)
    (ax,) = step_axes(fig)
    mesh = ax.collections[0]
    assert mesh.get_array().shape[1] <= MAX_HEATMAP_COLUMNS
    rows = [t.get_text() for t in visible_tick_labels(ax.yaxis)]
    if name == "one_step":
        assert ticks == [0]
    if name == "wide":
        assert 20 <= len(rows) < 200 and all(len(r) <= MAX_LABEL_CHARS for r in rows)
    if ACTIVATION_HEATMAPS[figure].limits is not None:  # fractions and slopes: one scale for every run
        assert mesh.get_clim() == (0.0, 1.0)
    if figure == "dead_or_saturated_heatmap":  # every module has one of the two, each named in the caption
        assert mesh.get_array().shape[0] == len(activation_runs[name].modules)
        caption = "\n".join(t.get_text() for t in fig.texts)
        assert "dead fraction" in caption and "saturated fraction" in caption


def test_a_run_non_finite_after_its_first_steps_says_so_and_lists_only_drawn_lines(tmp_path):
    writer = SummaryWriter(str(tmp_path / "nan" / "run"))
    for step in range(0, 40, 5):
        norms = {f"grad_norm/net.{i}": (1.0 + i if step < 10 else float("nan")) for i in range(3)}
        norms["grad_norm/net.3"] = float("nan")  # never finite: no line, so no legend entry
        write_scalars(writer, norms, step)
    writer.close()
    (run,) = load_runs(tmp_path / "nan")
    fig = draw(plot_norm_curves, run)
    caption = "\n".join(t.get_text() for t in fig.texts)
    assert "non-finite or zero from step 10 on (6 of 8 logged steps): the curves end at step 5" in caption
    assert "net.3" not in legend_entries(fig) and len(legend_entries(fig)) == 3


def test_layers_are_drawn_in_forward_order_when_activation_monitor_saw_it_and_the_caption_says_which(tmp_path):
    writer = SummaryWriter(str(tmp_path / "order" / "run"))
    # Registered decoder first, called encoder first: ActivationMonitor logs in call order.
    write_scalars(writer, {"grad_norm/decoder": 1.0, "grad_norm/encoder": 2.0, "grad_norm/head": 3.0}, 0)
    write_scalars(writer, {"activation_rms/encoder": 1.0, "activation_rms/decoder": 1.0}, 0)
    writer.close()
    writer = SummaryWriter(str(tmp_path / "plain" / "run"))
    write_scalars(writer, {"grad_norm/decoder": 1.0, "grad_norm/encoder": 2.0}, 0)
    writer.close()
    (ordered,) = load_runs(tmp_path / "order")
    (plain,) = load_runs(tmp_path / "plain")
    assert ordered.layers() == ["encoder", "decoder", "head"] and plain.layers() == ["decoder", "encoder"]
    for run, words in ((ordered, "Layers in forward order"), (plain, "in the order the model registers them")):
        for plot in (plot_heatmap, plot_norm_curves, plot_gradient_flow):
            fig = draw(plot, run)
            assert words in "\n".join(t.get_text() for t in fig.texts), plot.__name__
