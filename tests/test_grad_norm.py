"""GradNormMonitor in real Trainer runs: which tags at which steps, values equal to norms taken by hand on the
gradients and weights of the same step, and a run that is not changed by being watched."""

from __future__ import annotations

import copy
import csv
import math
import re
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    MLP,
    accumulator,
    fit,
    hand_norms,
    hand_total,
    logdir,
    make_loader,
    mlp_layers,
    norm_monitor,
    read_layouts,
    read_scalars,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2
from torch import nn

from gradmon import GradHealthMonitor, GradNormMonitor
from gradmon.callbacks import _logging
from gradmon.naming import layer_name

LAYERS = mlp_layers(depth=3)
PER_LAYER = ("grad_norm", "grad_norm_log10", "weight_norm", "update_ratio", "update_ratio_log10")


class Recorder(pl.Callback):
    """Per optimizer step: the gradients and weights the monitor saw (same hook, registered after it) and the
    weights after the step."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self._step: int | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._step = trainer.global_step
        params = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
        self.grads[self._step] = {n: p.grad.detach().clone() for n, p in params}
        self.before[self._step] = {n: p.detach().clone() for n, p in params}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self._step is not None:
            self.after[self._step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self._step = None


def expected(rec: Recorder, step: int, p: float = 2.0, group_by: str = "layer") -> dict[str, float]:
    """Every scalar GradNormMonitor should log at ``step``, computed by hand from what ``rec`` captured."""
    grads, before, after = rec.grads[step], rec.before[step], rec.after[step]
    grad = hand_norms(grads, p, group_by)
    weight = hand_norms(before, p, group_by)
    update = hand_norms({n: after[n] - before[n] for n in before}, p, group_by)
    values = {"grad_norm/total": hand_total(grads, p)}
    for layer in grad:
        values[f"grad_norm/{layer}"] = grad[layer]
        values[f"grad_norm_log10/{layer}"] = math.log10(grad[layer])
        values[f"weight_norm/{layer}"] = weight[layer]
        values[f"update_ratio/{layer}"] = update[layer] / weight[layer]
        values[f"update_ratio_log10/{layer}"] = math.log10(update[layer] / weight[layer])
    return values


def gradmon_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    return {tag: v for tag, v in read_scalars(logdir).items() if tag.split("/")[0] in PER_LAYER}


def assert_logged(logged: dict[str, dict[int, float]], rec: Recorder, steps: list[int], p: float = 2.0,
                  group_by: str = "layer") -> None:
    """Exactly the expected tags, each at exactly ``steps``, with the hand-computed values."""
    want = {step: expected(rec, step, p, group_by) for step in steps}
    assert set(logged) == set(want[steps[0]])
    for tag, by_step in logged.items():
        assert sorted(by_step) == steps, tag
        for step in steps:
            assert by_step[step] == pytest.approx(want[step][tag], rel=1e-5, abs=1e-6), (tag, step)


def recorded_fit(tmp_path: Path | None, model: pl.LightningModule, monitor: pl.Callback, steps: int, **kwargs
                 ) -> Recorder:
    """Fit ``model`` for ``steps`` optimizer steps with ``monitor`` and a Recorder after it."""
    rec = Recorder()
    fit(model, [monitor, rec], steps=steps, tmp_path=tmp_path, **kwargs)
    return rec


def tags(prefix: str, layers: list[str]) -> set[str]:
    return {f"{prefix}/{layer}" for layer in layers}


def all_tags(layers: list[str]) -> set[str]:
    return set().union(*(tags(prefix, layers) for prefix in PER_LAYER)) | {"grad_norm/total"}


# --------------------------------------------------------------------------------------------------- schedule


def test_logs_every_n_steps_at_steps_0_n_2n_with_exact_tags_and_hand_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rec = recorded_fit(tmp_path, MLP(), norm_monitor(log_every_n_steps=2), steps=6)
    logged = gradmon_scalars(logdir(tmp_path))
    assert set(logged) == all_tags(LAYERS)
    assert_logged(logged, rec, [0, 2, 4])


def test_each_logging_step_is_one_tensorboard_summary_holding_all_its_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    recorded_fit(tmp_path, MLP(), norm_monitor(log_every_n_steps=2), steps=4)
    (path,) = logdir(tmp_path).glob("events.out.tfevents.*")
    summaries = []
    for raw in RawEventFileLoader(str(path)).Load():
        event = event_pb2.Event.FromString(raw)
        names = {v.tag for v in event.summary.value}
        if names & all_tags(LAYERS):
            summaries.append((event.step, names))
    assert summaries == [(0, all_tags(LAYERS)), (2, all_tags(LAYERS))]


def test_default_interval_is_the_trainers_log_every_n_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    recorded_fit(tmp_path, MLP(), norm_monitor(), steps=7, log_every_n_steps=3)
    logged = gradmon_scalars(logdir(tmp_path))
    assert {tag: sorted(v) for tag, v in logged.items()} == {tag: [0, 3, 6] for tag in all_tags(LAYERS)}


class MixedMLP(MLP):
    """An MLP whose head is float64: two (device, dtype) groups, whose norms are stacked into one vector and read
    later, as on a GPU (a model of one dtype in host memory has its norms read as floats at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.net[-1].double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[-1](self.net[:-1](x).double())


@pytest.mark.parametrize("path", ["device", "host"])
def test_no_host_sync_and_no_work_on_steps_that_do_not_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           path: str) -> None:
    """Every .tolist()/.item() during training is attributed to the step whose batch is running (the last one, at
    train end, to the last step)."""
    syncs: Counter[int | None] = Counter()
    computed: list[int] = []
    step: list[int | None] = [None]

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            step[0] = trainer.global_step

    monitor = norm_monitor(log_every_n_steps=2)
    original_grad_norms = monitor.source.grad_norms
    monkeypatch.setattr(
        monitor.source, "grad_norms", lambda s, m, o: computed.append(s) or original_grad_norms(s, m, o)
    )
    for method in ("tolist", "item"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, _o=original: syncs.update([step[0]]) or _o(self))
    torch.manual_seed(0)
    fit(MixedMLP() if path == "device" else MLP(), [Clock(), monitor], steps=6, tmp_path=tmp_path)
    assert computed == [0, 2, 4]
    read = {s: n for s, n in syncs.items() if s is not None}
    if path == "device":
        # One transfer per logging step, read on the host during the next batch from a copy sent at the end of the
        # logging batch: the host never waits for the device.
        assert read == {1: 1, 3: 1, 5: 1}
    else:
        # In host memory there is no device to wait for: the 8 norms of the gradients, of the weights and of the
        # update are read as they are taken, in the logging step, and nothing in the others.
        assert read == {0: 24, 2: 24, 4: 24}


def test_grad_health_monitor_reuses_the_norms_of_the_step(tmp_path: Path, norm_computations: list[float]) -> None:
    monitors = [norm_monitor(log_every_n_steps=1), GradHealthMonitor(log_every_n_steps=1)]
    torch.manual_seed(0)
    fit(MLP(), monitors, steps=3, tmp_path=tmp_path)
    assert len(norm_computations) == 3


# --------------------------------------------------------------------------------------------------- values


def test_values_equal_hand_norms_with_adam(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rec = recorded_fit(tmp_path, MLP(optimizer="adam", lr=1e-2), norm_monitor(log_every_n_steps=1), steps=3)
    assert_logged(gradmon_scalars(logdir(tmp_path)), rec, [0, 1, 2])


def test_update_ratio_with_sgd_is_lr_times_grad_norm_over_weight_norm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    recorded_fit(tmp_path, MLP(lr=0.05), norm_monitor(log_every_n_steps=1), steps=3)
    logged = gradmon_scalars(logdir(tmp_path))
    for layer in LAYERS:
        for step in range(3):
            want = 0.05 * logged[f"grad_norm/{layer}"][step] / logged[f"weight_norm/{layer}"][step]
            assert logged[f"update_ratio/{layer}"][step] == pytest.approx(want, rel=1e-4)


def test_first_gradient_norm_equals_the_norm_of_the_loss_gradient_recomputed_on_the_first_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    start = copy.deepcopy(model)
    recorded_fit(tmp_path, model, norm_monitor(log_every_n_steps=1), steps=1)
    x, y = next(iter(make_loader(steps=1)))
    start.training_step((x, y), 0).backward()
    grads = {n: p.grad for n, p in start.named_parameters()}
    logged = gradmon_scalars(logdir(tmp_path))
    for layer, norm in hand_norms(grads, 2.0).items():
        assert logged[f"grad_norm/{layer}"][0] == pytest.approx(norm, rel=1e-5)
    assert logged["grad_norm/total"][0] == pytest.approx(hand_total(grads, 2.0), rel=1e-5)


@pytest.mark.parametrize(("norm_type", "p"), [("inf", math.inf), (1, 1.0), (3.0, 3.0)])
def test_norm_type_sets_the_p_of_every_logged_norm(tmp_path: Path, norm_type, p: float) -> None:
    torch.manual_seed(0)
    rec = recorded_fit(tmp_path, MLP(), norm_monitor(norm_type=norm_type, log_every_n_steps=2), steps=3)
    assert_logged(gradmon_scalars(logdir(tmp_path)), rec, [0, 2], p=p)


def test_accumulated_gradient_is_logged_once_per_optimizer_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    start = copy.deepcopy(model)
    monitor = norm_monitor(log_every_n_steps=1)
    rec = recorded_fit(tmp_path, model, monitor, steps=3, batches=6, accumulate_grad_batches=2)
    logged = gradmon_scalars(logdir(tmp_path))
    assert_logged(logged, rec, [0, 1, 2])
    # Step 0 is the mean of the losses of batches 0 and 1, at the initial weights.
    batches = iter(make_loader(steps=6))
    for i in range(2):
        (start.training_step(next(batches), i) / 2).backward()
    grads = {n: p.grad for n, p in start.named_parameters()}
    assert logged["grad_norm/total"][0] == pytest.approx(hand_total(grads, 2.0), rel=1e-5)


def test_logged_norm_is_the_gradient_before_clipping(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clip, lr = 1e-3, 0.05
    rec = recorded_fit(tmp_path, MLP(lr=lr), norm_monitor(log_every_n_steps=1), steps=2, gradient_clip_val=clip)
    logged = gradmon_scalars(logdir(tmp_path))
    assert_logged(logged, rec, [0, 1])
    for step in (0, 1):
        assert logged["grad_norm/total"][step] > 100 * clip
        # SGD moved the weights by lr times the clipped gradient: clipping did happen after the monitor looked.
        moved = hand_total({n: rec.after[step][n] - w for n, w in rec.before[step].items()}, 2.0)
        assert moved / lr == pytest.approx(clip, rel=1e-3)


def test_logged_norm_is_the_gradient_after_amp_unscaling(tmp_path: Path) -> None:
    # fp16 AMP with a GradScaler, on the CPU: Lightning only refuses the "16-mixed" string there, not the plugin.
    scale = 2.0**10
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    torch.manual_seed(0)
    model = MLP()
    start = copy.deepcopy(model)
    rec = recorded_fit(tmp_path, model, norm_monitor(log_every_n_steps=1), steps=1, plugins=[plugin])
    logged = gradmon_scalars(logdir(tmp_path))
    assert_logged(logged, rec, [0])
    start.training_step(next(iter(make_loader(steps=1))), 0).backward()
    unscaled = hand_total({n: p.grad for n, p in start.named_parameters()}, 2.0)
    assert logged["grad_norm/total"][0] == pytest.approx(unscaled, rel=1e-2)  # fp16 autocast, not 1024 times it


def test_update_ratios_can_be_turned_off(tmp_path: Path) -> None:
    torch.manual_seed(0)
    recorded_fit(tmp_path, MLP(), norm_monitor(log_every_n_steps=1, log_update_ratios=False), steps=2)
    assert set(gradmon_scalars(logdir(tmp_path))) == all_tags(LAYERS) - tags("update_ratio", LAYERS) - tags(
        "update_ratio_log10", LAYERS
    )


def test_weight_norms_can_be_turned_off(tmp_path: Path) -> None:
    torch.manual_seed(0)
    recorded_fit(tmp_path, MLP(), norm_monitor(log_every_n_steps=1, log_weight_norms=False), steps=2)
    assert set(gradmon_scalars(logdir(tmp_path))) == all_tags(LAYERS) - tags("weight_norm", LAYERS)


class WithDeadGate(MLP):
    """``gate`` (on the root module) enters the loss times zero: its gradient exists and is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.ones(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + 0.0 * self.gate


def test_log10_is_left_out_for_a_zero_norm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    recorded_fit(tmp_path, WithDeadGate(), norm_monitor(log_every_n_steps=1), steps=1)
    logged = gradmon_scalars(logdir(tmp_path))
    assert set(logged) == all_tags(["gate", *LAYERS]) - {"grad_norm_log10/gate", "update_ratio_log10/gate"}
    assert logged["grad_norm/gate"] == {0: 0.0}
    assert logged["update_ratio/gate"] == {0: 0.0}
    assert logged["weight_norm/gate"][0] == pytest.approx(math.sqrt(10))


# --------------------------------------------------------------------------------------------------- layers


def test_group_by_parameter_logs_every_parameter_under_its_full_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rec = recorded_fit(tmp_path, MLP(), norm_monitor(group_by="parameter", log_every_n_steps=2), steps=3)
    logged = gradmon_scalars(logdir(tmp_path))
    params = [f"{layer}.{kind}" for layer in LAYERS for kind in ("weight", "bias")]
    assert set(logged) == all_tags(params)
    assert_logged(logged, rec, [0, 2], group_by="parameter")


class WithRootParameter(MLP):
    """A per-class scale registered on the root module: the layer ``scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def test_a_parameter_registered_on_the_root_module_is_its_own_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rec = recorded_fit(tmp_path, WithRootParameter(), norm_monitor(log_every_n_steps=2), steps=3)
    logged = gradmon_scalars(logdir(tmp_path))
    assert set(logged) == all_tags(["scale", *LAYERS])
    assert_logged(logged, rec, [0, 2])


class PartlyFrozen(MLP):
    """``net.0`` frozen (requires_grad=False) and ``unused`` never reached by the loss (its grad stays None)."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)
        self.unused = nn.Linear(3, 3)


def test_frozen_and_unused_parameters_are_left_out(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rec = recorded_fit(tmp_path, PartlyFrozen(), norm_monitor(log_every_n_steps=2), steps=3)
    logged = gradmon_scalars(logdir(tmp_path))
    assert set(logged) == all_tags(LAYERS[1:])
    assert set(rec.grads[0]) == {f"{layer}.{kind}" for layer in LAYERS[1:] for kind in ("weight", "bias")}
    assert_logged(logged, rec, [0, 2])


class TiedMLP(MLP):
    """``net.2.weight`` is ``net.0.weight`` (both 8x8): the tensor belongs to ``net.0``, its first name."""

    def __init__(self) -> None:
        super().__init__(depth=2, width=8, in_features=8)
        self.net[2].weight = self.net[0].weight


def test_tied_weights_are_counted_once_under_their_first_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rec = recorded_fit(tmp_path, TiedMLP(), norm_monitor(log_every_n_steps=1), steps=2)
    logged = gradmon_scalars(logdir(tmp_path))
    assert set(logged) == all_tags(["net.0", "net.2", "net.4"])
    # named_parameters() names the tied tensor once, so Recorder's by-hand norms count it once too.
    assert set(rec.grads[0]) == {"net.0.weight", "net.0.bias", "net.2.bias", "net.4.weight", "net.4.bias"}
    assert_logged(logged, rec, [0, 1])


class AllFrozen(MLP):
    """No trainable parameter: the loss has no gradient, so no step returns one."""

    def __init__(self) -> None:
        super().__init__()
        self.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        return None


def test_a_model_without_trainable_parameters_warns_once_and_logs_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning) as record:
        recorded_fit(tmp_path, AllFrozen(), norm_monitor(log_every_n_steps=1), steps=3)
    ours = [w for w in record if "no trainable parameters" in str(w.message)]
    assert len(ours) == 1 and "GradNormMonitor" in str(ours[0].message)
    assert gradmon_scalars(logdir(tmp_path)) == {}


class Manual(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_is_monitored_at_each_optimizer_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rec = recorded_fit(tmp_path, Manual(), norm_monitor(log_every_n_steps=2), steps=6)
    assert_logged(gradmon_scalars(logdir(tmp_path)), rec, [0, 2, 4])


def test_a_float64_model_is_monitored(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rec = recorded_fit(tmp_path, MLP(), norm_monitor(log_every_n_steps=1), steps=2, precision="64-true")
    assert_logged(gradmon_scalars(logdir(tmp_path)), rec, [0, 1])


# --------------------------------------------------------------------------------------------------- loggers


def test_without_a_logger_the_monitor_does_nothing_and_training_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = norm_monitor(log_every_n_steps=1, histogram_every_n_steps=1)
    calls: list[int] = []
    monkeypatch.setattr(monitor.source, "grad_norms", lambda *args: calls.append(1))
    torch.manual_seed(0)
    rec = recorded_fit(None, MLP(), monitor, steps=3, logger=False)
    assert sorted(rec.after) == [0, 1, 2]
    assert calls == []


def read_csv(path: Path) -> dict[str, dict[int, float]]:
    """metrics.csv as {column: {step: value}}, empty cells left out."""
    out: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            for key, value in row.items():
                if value != "":
                    out.setdefault(key, {})[step] = float(value)
    return out


def test_csv_and_tensorboard_loggers_both_get_the_scalars_and_only_tensorboard_the_histograms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages: list[str] = []
    monkeypatch.setattr(_logging, "rank_zero_info", messages.append)
    loggers = [TensorBoardLogger(tmp_path, name="tb", version=0), CSVLogger(tmp_path, name="csv", version=0)]
    torch.manual_seed(0)
    monitor = GradNormMonitor(log_every_n_steps=2, histogram_every_n_steps=2)  # images on: CSV says it takes none
    rec = recorded_fit(None, MLP(), monitor, steps=6, logger=loggers)
    assert_logged(gradmon_scalars(logdir(tmp_path)), rec, [0, 2, 4])
    csv_values = read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert_logged({tag: v for tag, v in csv_values.items() if tag.split("/")[0] in PER_LAYER}, rec, [0, 2, 4])
    assert messages == ["gradmon: CSVLogger has no histograms; logging only its scalars.",
                        "gradmon: CSVLogger takes no images; the figures go to TensorBoard and W&B loggers only."]
    assert set(accumulator(logdir(tmp_path)).Tags()["histograms"]) == tags("grad_hist", LAYERS) | tags(
        "weight_hist", LAYERS
    )


def test_csv_logger_alone_gets_scalars_and_no_crash_with_histograms_on(tmp_path: Path) -> None:
    torch.manual_seed(0)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    monitor = norm_monitor(log_every_n_steps=2, histogram_every_n_steps=1)
    rec = recorded_fit(None, MLP(), monitor, steps=4, logger=logger)
    csv_values = read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert_logged({tag: v for tag, v in csv_values.items() if tag.split("/")[0] in PER_LAYER}, rec, [0, 2])


def test_histograms_follow_their_own_interval_and_hold_the_layer_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rec = recorded_fit(tmp_path, MLP(), norm_monitor(log_every_n_steps=2, histogram_every_n_steps=3), steps=7)
    acc = accumulator(logdir(tmp_path))
    assert set(acc.Tags()["histograms"]) == tags("grad_hist", LAYERS) | tags("weight_hist", LAYERS)
    assert_logged(gradmon_scalars(logdir(tmp_path)), rec, [0, 2, 4, 6])
    for layer in LAYERS:
        for prefix, source in (("grad_hist", rec.grads), ("weight_hist", rec.before)):
            events = acc.Histograms(f"{prefix}/{layer}")
            assert [e.step for e in events] == [0, 3, 6]
            for e in events:
                values = torch.cat([t.reshape(-1) for n, t in source[e.step].items() if layer_name(n) == layer])
                h = e.histogram_value
                assert h.num == values.numel()
                assert (h.min, h.max) == pytest.approx((values.min().item(), values.max().item()), rel=1e-6)
                assert h.sum == pytest.approx(values.double().sum().item(), rel=1e-4, abs=1e-6)


def test_histograms_are_off_by_default(tmp_path: Path) -> None:
    torch.manual_seed(0)
    recorded_fit(tmp_path, MLP(), norm_monitor(log_every_n_steps=1), steps=2)
    assert accumulator(logdir(tmp_path)).Tags()["histograms"] == []


def test_custom_scalars_layout_is_written_once_per_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    recorded_fit(tmp_path, MLP(), norm_monitor(log_every_n_steps=1), steps=4)
    (layout,) = read_layouts(logdir(tmp_path))
    # Titled for the model: TensorBoard merges the layouts of a logdir by category title.
    assert [c.title for c in layout.category] == [f"gradmon · MLP, {len(LAYERS)} layers"]
    charts = {chart.title: list(chart.multiline.tag) for chart in layout.category[0].chart}
    assert charts == {
        "gradient norm by layer": [r"grad_norm/(?!total$|total-).*"],
        "log10 gradient norm by layer": [r"grad_norm_log10/.*"],
        "update ratio by layer": [r"update_ratio/.*"],
        "log10 update ratio by layer": [r"update_ratio_log10/.*"],
        "weight norm by layer": [r"weight_norm/.*"],
    }
    # The per-layer chart's regex picks every layer's norm and leaves the total to its own chart.
    logged = set(gradmon_scalars(logdir(tmp_path)))
    picked = {tag for tag in logged if re.fullmatch(charts["gradient norm by layer"][0], tag)}
    assert picked == tags("grad_norm", LAYERS)


# --------------------------------------------------------------------------------------------------- the run itself


def test_monitoring_does_not_change_the_run(tmp_path: Path) -> None:
    def final_weights(callbacks: list[pl.Callback], path: Path) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = MLP(optimizer="adam", lr=1e-2)
        fit(model, callbacks, steps=6, batches=12, tmp_path=path, gradient_clip_val=0.5, accumulate_grad_batches=2)
        return model.state_dict()

    health = GradHealthMonitor(on_exploding="skip", on_nonfinite="skip", log_every_n_steps=1)
    monitors = [norm_monitor(log_every_n_steps=1, histogram_every_n_steps=1), health]
    watched = final_weights(monitors, tmp_path / "watched")
    plain = final_weights([], tmp_path / "plain")
    assert health.events == [] and health.skipped_steps == 0
    assert watched.keys() == plain.keys()
    for name in plain:
        assert torch.equal(watched[name], plain[name]), name
    assert sorted(read_scalars(logdir(tmp_path / "watched"))["grad_norm/total"]) == list(range(6))


# --------------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "name", "value"),
    [
        ({"norm_type": 0}, "norm_type", 0),
        ({"norm_type": -1}, "norm_type", -1),
        ({"norm_type": "foo"}, "norm_type", "foo"),
        ({"group_by": "module"}, "group_by", "module"),
        ({"log_every_n_steps": 0}, "log_every_n_steps", 0),
        ({"histogram_every_n_steps": 0}, "histogram_every_n_steps", 0),
    ],
)
def test_bad_arguments_raise_value_error_naming_argument_and_value(kwargs: dict, name: str, value) -> None:
    with pytest.raises(ValueError, match=re.escape(f"`{name}={value!r}`")):
        GradNormMonitor(**kwargs)


@pytest.mark.parametrize(("norm_type", "want"), [("inf", math.inf), (float("inf"), math.inf), (1, 1.0), (0.5, 0.5)])
def test_norm_type_accepts_any_positive_p_and_inf(norm_type, want: float) -> None:
    assert norm_monitor(norm_type=norm_type).norm_type == want
