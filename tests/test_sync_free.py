"""GradHealthMonitor(sync_free=True) on the CPU: the same decisions as the default mode, the skip taken on the device
(fused optimizers leave weights and Adam state untouched), the host's judgement one step late, and no blocking host
read on any step."""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import MLP, PlantNaN, make_loader, read_scalars, trainer

import gradmon.norms as gradmon_norms
from gradmon import GradHealthMonitor, GradientHealthError, GradientHealthWarning, GradNormMonitor
from gradmon.health import HealthRules


class FusedMLP(MLP):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01, fused=True)


class Snapshot(pl.Callback):
    """Weights and Adam state at the start of every batch."""

    def __init__(self) -> None:
        self.states: dict[int, tuple[dict, dict]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.states[trainer.global_step] = (
            copy.deepcopy(pl_module.state_dict()), copy.deepcopy(trainer.optimizers[0].state_dict())
        )


class HostReads(pl.Callback):
    """Counts gradmon's blocking host reads per step (every one goes through gradmon.norms.read_host)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.step = None
        self.reads: Counter[int] = Counter()
        original = gradmon_norms.read_host

        def counted(tensor):
            self.reads[self.step] += 1
            return original(tensor)

        # Every module that imports it: the norms, the sync-free mode and the GradScaler helpers.
        for module in ("gradmon.norms", "gradmon.callbacks._health_modes", "gradmon.callbacks._grad_source"):
            monkeypatch.setattr(f"{module}.read_host", counted)

    def on_train_batch_start(self, trainer, *args) -> None:
        self.step = trainer.global_step


def fit(model, callbacks, steps, tmp_path=None):
    t = trainer(tmp_path, max_steps=steps, callbacks=callbacks)
    t.fit(model, make_loader(batch_size=16, steps=steps))
    return t


def health_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, GradientHealthWarning)]


def test_a_nan_is_skipped_on_the_device_and_weights_and_adam_state_stay_exactly_as_before(monkeypatch) -> None:
    torch.manual_seed(0)
    snapshot, reads = Snapshot(), HostReads(monkeypatch)
    monitor = GradHealthMonitor(on_nonfinite="skip", sync_free=True, diagnose=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(FusedMLP(depth=2), [PlantNaN(3, element=(0, 0)), monitor, snapshot, reads], steps=6)
    (weights_3, adam_3), (weights_4, adam_4) = snapshot.states[3], snapshot.states[4]
    assert all(torch.equal(weights_3[k], weights_4[k]) for k in weights_3)
    assert all(torch.equal(v, adam_4["state"][i][k]) for i in adam_3["state"] for k, v in adam_3["state"][i].items())
    assert not torch.equal(snapshot.states[4][0]["net.0.weight"], snapshot.states[5][0]["net.0.weight"])  # trains on
    assert [(e.step, e.layer, e.condition) for e in monitor.events] == [(3, "net.2", "nonfinite")]
    assert monitor.skipped_steps == 1
    (message,) = health_warnings(record)
    assert "step 3" in message and "was skipped" in message
    assert sum(reads.reads.values()) == 0  # no blocking host read on any step


def test_the_host_judges_each_step_one_step_later() -> None:
    judged_at: list[tuple[int, int]] = []

    class Clock(pl.Callback):
        step = None

        def on_train_batch_start(self, trainer, *args) -> None:
            self.step = trainer.global_step

    class Spy(GradHealthMonitor):
        def setup(self, trainer, pl_module, stage) -> None:
            super().setup(trainer, pl_module, stage)
            update = self.tracker.update  # the tracker is rebuilt at setup
            self.tracker.update = lambda step, *a: judged_at.append((step, clock.step)) or update(step, *a)

    clock = Clock()
    torch.manual_seed(0)
    monitor = Spy(on_nonfinite="raise", sync_free=True)
    t = trainer(None, max_steps=6, callbacks=[clock, PlantNaN(2, element=(0, 0)), monitor])
    with pytest.raises(GradientHealthError, match=r"non-finite gradients at step 2, first in layer net\.2"):
        t.fit(FusedMLP(depth=2), make_loader(batch_size=16, steps=6))
    assert judged_at == [(0, 1), (1, 2), (2, 3)]  # step k's numbers are judged during step k + 1
    assert t.global_step == 3  # the raise came at step 3, before its update


def test_decisions_match_the_default_mode_on_a_deep_sigmoid_net() -> None:
    events = {}
    for sync_free in (False, True):
        torch.manual_seed(0)
        monitor = GradHealthMonitor(on_vanishing="ignore", sync_free=sync_free)
        fit(MLP(depth=10, width=32, in_features=8, activation="sigmoid"), [monitor], steps=20)
        events[sync_free] = [(e.step, e.layer, e.condition, e.rule) for e in monitor.events]
    assert events[True] == events[False] and events[True]


def test_sync_free_logs_the_same_counts_at_the_same_steps(tmp_path: Path) -> None:
    scalars = {}
    for sync_free in (False, True):
        torch.manual_seed(0)
        monitor = GradHealthMonitor(on_nonfinite="skip", log_every_n_steps=4, sync_free=sync_free)
        fit(FusedMLP(depth=2), [PlantNaN(3, element=(0, 0)), monitor], steps=9, tmp_path=tmp_path / str(sync_free))
        scalars[sync_free] = read_scalars(tmp_path / str(sync_free) / "tb" / "version_0")
    assert scalars[True]["grad_health/nonfinite"] == {0: 0.0, 3: 1.0, 4: 0.0, 8: 0.0}
    assert scalars[True]["grad_health/skipped_steps"] == scalars[False]["grad_health/skipped_steps"]


def test_exploding_patience_is_counted_on_the_device(monkeypatch) -> None:
    class Blow(pl.Callback):
        def on_after_backward(self, trainer, pl_module) -> None:
            if trainer.global_step in (2, 3, 4):
                for p in pl_module.parameters():
                    p.grad.mul_(1e8)

    torch.manual_seed(0)
    snapshot, reads = Snapshot(), HostReads(monkeypatch)
    monitor = GradHealthMonitor(HealthRules(exploding_patience=2, spike_factor=None), on_exploding="skip",
                                sync_free=True, diagnose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientHealthWarning)
        fit(FusedMLP(depth=2), [Blow(), monitor, snapshot, reads], steps=7)
    states = snapshot.states
    changed = {s: not torch.equal(states[s][0]["net.0.weight"], states[s + 1][0]["net.0.weight"]) for s in range(6)}
    assert changed == {0: True, 1: True, 2: True, 3: False, 4: False, 5: True}  # the 2nd and 3rd step above: skipped
    assert monitor.skipped_steps == 2 and sum(reads.reads.values()) == 0


def test_an_optimizer_without_found_inf_falls_back_to_a_host_read_and_says_so(monkeypatch) -> None:
    torch.manual_seed(0)
    snapshot, reads = Snapshot(), HostReads(monkeypatch)
    monitor = GradHealthMonitor(on_nonfinite="skip", sync_free=True, diagnose=False)
    with pytest.warns(UserWarning, match=r"SGD cannot take a device-side skip flag.*fused=True"):
        fit(MLP(depth=2), [PlantNaN(2, element=(0, 0)), monitor, snapshot, reads], steps=4)
    assert all(torch.equal(snapshot.states[2][0][k], snapshot.states[3][0][k]) for k in snapshot.states[2][0])
    assert dict(reads.reads) == {0: 1, 1: 1, 2: 1, 3: 1}  # the skip flag, read on the host every step
    assert monitor.skipped_steps == 1


def test_the_skip_flag_is_handed_over_for_one_step_only() -> None:
    torch.manual_seed(0)
    model = FusedMLP(depth=2)
    monitor = GradHealthMonitor(on_nonfinite="skip", sync_free=True)
    t = fit(model, [PlantNaN(1, element=(0, 0)), monitor], steps=3)
    assert not hasattr(t.optimizers[0], "found_inf")
    assert monitor.skipped_steps == 1


def test_grad_norm_monitor_beside_a_sync_free_monitor_logs_the_gradients_of_a_skipped_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callbacks = [PlantNaN(1, element=(0, 0)), GradHealthMonitor(on_nonfinite="skip", sync_free=True),
                 GradNormMonitor(log_every_n_steps=1)]
    fit(FusedMLP(depth=2), callbacks, steps=3, tmp_path=tmp_path)
    scalars = read_scalars(tmp_path / "tb" / "version_0")
    assert math.isnan(scalars["grad_norm/net.2"][1]) and scalars["update_ratio/net.0"][1] == 0.0


def test_the_flag_is_or_ed_with_a_grad_scalers_own_and_never_replaces_it() -> None:
    from lightning.pytorch.plugins import MixedPrecision

    class Blow(pl.Callback):  # finite but above the threshold: the scaler sees no overflow, gradmon skips
        def on_after_backward(self, trainer, pl_module) -> None:
            if trainer.global_step == 2:
                for p in pl_module.parameters():
                    p.grad.mul_(1e6)

    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    snapshot = Snapshot()
    monitor = GradHealthMonitor(HealthRules(exploding_threshold=1e3, spike_factor=None), on_exploding="skip",
                                sync_free=True)
    t = trainer(None, max_steps=4, callbacks=[Blow(), monitor, snapshot],
                plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientHealthWarning)
        t.fit(FusedMLP(depth=2), make_loader(batch_size=16, steps=4))
    (weights_2, _), (weights_3, _) = snapshot.states[2], snapshot.states[3]
    assert all(torch.equal(weights_2[k], weights_3[k]) for k in weights_2)  # gradmon's flag skipped step 2
    assert not torch.equal(snapshot.states[1][0]["net.0.weight"], weights_2["net.0.weight"])
    assert monitor.skipped_steps == 1 and monitor.amp_overflow_steps == 0
    assert scaler.get_scale() == 2.0**8  # the scaler's own state is untouched: no overflow was its to count


def test_without_a_device_skip_only_the_norm_kernel_runs_each_step() -> None:
    # With no "skip" action there is nothing to decide on the device: the per-tensor norms go to the host as they are
    # and the layers' norms are made there a step later (on a GPU each extra kernel is a launch on the host's clock).
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.per_step: dict[int, Counter[str]] = {}
            self.step = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.per_step.setdefault(self.step, Counter())[str(func)] += 1
            return func(*args, **(kwargs or {}))

    ops = Ops()

    class Counted(GradHealthMonitor):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            ops.step = trainer.global_step
            with ops:
                super().on_before_optimizer_step(trainer, pl_module, optimizer)

    torch.manual_seed(0)
    monitor = Counted(sync_free=True, log_every_n_steps=100)
    fit(MLP(depth=3), [monitor], steps=6)
    assert sorted(ops.per_step) == [0, 1, 2, 3, 4, 5]
    for step, counts in ops.per_step.items():
        # One fused norm kernel over the 8 gradients, whose results, in host memory, are read as they are taken
        # (there is no device to wait for); the decisions on the device take them as one vector from there.
        assert counts == Counter({"aten._foreach_norm.Scalar": 1, "aten._local_scalar_dense.default": 8}), step
    # Every step judged, the last at the end of the fit.
    assert monitor.tracker.state_dict()["seen"] == {"net.0": 6, "net.2": 6, "net.4": 6, "net.6": 6}


class FusedAdamMLP(MLP):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01, fused=True)


class Overflow(pl.Callback):
    """Finite gradient entries of 1e30 at step 2: their float32 2-norm overflows to inf."""

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 2:
            pl_module.net[2].weight.grad.fill_(1e30)


def test_both_modes_call_a_finite_gradient_whose_norm_overflows_non_finite_and_skip_it() -> None:
    results = {}
    for sync_free in (False, True):
        torch.manual_seed(0)
        model = FusedAdamMLP()
        monitor = GradHealthMonitor(on_nonfinite="skip", on_exploding="warn", sync_free=sync_free)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(max_steps=5, callbacks=[monitor, Overflow()]).fit(model, make_loader(16, 5))
        state = model.trainer.optimizers[0].state[model.net[2].weight]
        assert torch.isfinite(state["exp_avg_sq"]).all()  # the 1e60 squares never reached Adam's moments
        results[sync_free] = ([(e.step, e.layer, e.condition) for e in monitor.events], monitor.skipped_steps,
                              {k: v.clone() for k, v in model.state_dict().items()})
    assert results[False][0] == results[True][0] == [(2, "net.2", "nonfinite")]
    assert results[False][1] == results[True][1] == 1
    for name, weight in results[False][2].items():
        assert torch.equal(weight, results[True][2][name]), name
