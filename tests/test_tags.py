"""One vocabulary of tags: what a run logs, what the layout charts and the report read, and what the docs name all
come from gradmon.tags."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import MLP, PlantNaN, accumulator, fit, logdir, mlp_layers, read_scalars

from gradmon import GradCheck, GradHealthMonitor, GradNormMonitor, WeightInit, tags
from gradmon.report import load_run

TAGS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "tags.md"
METRICS = {
    tags.GRAD_NORM, tags.GRAD_NORM_LOG10, tags.WEIGHT_NORM, tags.UPDATE_RATIO, tags.UPDATE_RATIO_LOG10,
    tags.GRAD_HIST, tags.WEIGHT_HIST, tags.GRAD_HEALTH, tags.GRAD_HEALTH_FLAG, tags.GRADCHECK, tags.WEIGHT_INIT,
    tags.nonfinite_count(tags.GRAD_HIST), tags.nonfinite_count(tags.WEIGHT_HIST),
    tags.ACTIVATION_RMS, tags.ACTIVATION_RMS_LOG10, tags.ACTIVATION_GRAD_RMS, tags.ACTIVATION_GRAD_RMS_LOG10,
    tags.DEAD_FRACTION, tags.SATURATED_FRACTION, tags.ACTIVATION_SLOPE, tags.DIAGNOSIS,
}


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    """One run with every callback, a NaN planted at step 2 so health flags and non-finite counts are written."""
    tmp_path = tmp_path_factory.mktemp("tags")

    torch.manual_seed(0)
    callbacks = [WeightInit("kaiming_normal", seed=0), GradNormMonitor(log_every_n_steps=1, histogram_every_n_steps=2),
                 GradHealthMonitor(on_nonfinite="skip"), GradCheck(every_n_steps=2), PlantNaN(2)]
    fit(MLP(depth=2), callbacks, steps=4, tmp_path=tmp_path)
    return logdir(tmp_path)


def test_every_logged_tag_is_a_metric_of_the_vocabulary(logged: Path) -> None:
    acc = accumulator(logged)
    texts = [t.removesuffix("/text_summary") for t in acc.Tags()["tensors"] if t.endswith("/text_summary")]
    written = acc.Tags()["scalars"] + acc.Tags()["histograms"] + texts
    metrics = {re.sub(r"/.*", "", t) for t in written if "/" in t} - {"custom_scalars__config__"}
    assert metrics - {"epoch"} <= METRICS
    assert {tags.GRAD_NORM, tags.GRAD_HEALTH, tags.GRAD_HEALTH_FLAG, tags.GRADCHECK, tags.GRAD_HIST,
            tags.nonfinite_count(tags.GRAD_HIST), tags.WEIGHT_INIT} <= metrics


def test_a_flagged_layer_is_logged_with_its_condition_at_its_step(logged: Path) -> None:
    scalars = read_scalars(logged)
    assert scalars[tags.tag(tags.GRAD_HEALTH_FLAG, "net.2")] == {2: 3.0}  # non-finite
    assert scalars[tags.health_count("nonfinite")][2] == 1.0
    assert scalars[tags.total_tag()][2] != scalars[tags.total_tag()][2]  # NaN


def test_the_report_reads_the_same_tags(logged: Path) -> None:
    run = load_run(logged)
    assert run.layers() == mlp_layers(depth=2)
    assert run.layers(f"{tags.GRAD_HEALTH_FLAG}/") == ["net.2"]


def test_the_layout_charts_pick_layers_not_totals() -> None:
    regex = tags.LAYOUT_CHARTS["gradmon"][0][1]
    assert re.fullmatch(regex, tags.tag(tags.GRAD_NORM, "net.0"))
    assert not re.fullmatch(regex, tags.total_tag()) and not re.fullmatch(regex, tags.total_tag("Adam-1"))


def test_the_tags_page_names_every_metric() -> None:
    text = TAGS_PAGE.read_text()
    for metric in METRICS:
        assert f"`{metric}/" in text, metric
