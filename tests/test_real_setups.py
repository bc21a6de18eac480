"""GradNormMonitor and GradHealthMonitor on the setups people really train with: parameters unfrozen during training,
several optimizers, fp16 with a GradScaler, compiled submodules, logger prefixes, reused callbacks, resumes."""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    GAN,
    MLP,
    PlantNaN,
    accumulator,
    fit,
    gan_loader,
    health_warnings,
    logdir,
    make_loader,
    mlp_layers,
    norm_monitor,
    read_layouts,
    read_scalars,
)
from lightning.pytorch.callbacks import BackboneFinetuning
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from gradmon import GradHealthMonitor, GradientHealthError
from gradmon.callbacks.grad_health import EVENTS_IN_CHECKPOINT
from gradmon.health import HealthRules


class Grads(pl.Callback):
    """Every gradient the optimizer is about to apply, per step (listed after the monitors)."""

    def __init__(self) -> None:
        self.total: dict[int, float] = {}
        self.layers: dict[int, set[str]] = {}
        #: Copies of the gradients by parameter name.
        self.named: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.total[trainer.global_step] = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        names = {id(p): n.rsplit(".", 1)[0] for n, p in pl_module.named_parameters()}
        self.layers[trainer.global_step] = {names[id(p)] for p in params}
        with_grad = {id(p) for p in params}
        self.named[trainer.global_step] = {
            n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if id(p) in with_grad
        }


# --- parameters unfrozen during training -----------------------------------------------------------------------


class Finetune(pl.LightningModule):
    """A backbone and a head; the backbone starts frozen."""

    def __init__(self, backbone_in_optimizer: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)
        self.backbone_in_optimizer = backbone_in_optimizer
        self.backbone.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        params = self.parameters() if self.backbone_in_optimizer else self.head.parameters()
        return torch.optim.SGD(params, lr=0.05)


class Unfreeze(pl.Callback):
    """Flips ``requires_grad`` on the backbone (already in the optimizer) before one step."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            pl_module.backbone.requires_grad_(True)


def test_a_layer_unfrozen_by_requires_grad_is_logged_from_its_first_gradient_and_counted_in_the_total(
    tmp_path: Path,
) -> None:
    grads = Grads()
    fit(Finetune(), [Unfreeze(at_step=3), norm_monitor(log_every_n_steps=1), grads], steps=6, tmp_path=tmp_path,
        loader=make_loader(steps=6))
    scalars = read_scalars(logdir(tmp_path))
    assert sorted(scalars["grad_norm/backbone.0"]) == [3, 4, 5]
    assert sorted(scalars["grad_norm/head"]) == [0, 1, 2, 3, 4, 5]
    assert grads.layers[2] == {"head"} and grads.layers[3] == {"backbone.0", "backbone.2", "head"}
    for step, total in grads.total.items():
        assert scalars["grad_norm/total"][step] == pytest.approx(total, rel=1e-5)


def test_backbone_finetuning_adds_a_param_group_and_the_backbone_is_monitored_and_checked_from_then_on(
    tmp_path: Path,
) -> None:
    grads = Grads()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0, verbose=False)
    # A NaN in the backbone's gradient at one step, after it was unfrozen.
    nan = PlantNaN(6, layer="backbone.2", element=(0, 0))
    callbacks = [finetuning, norm_monitor(log_every_n_steps=1), GradHealthMonitor(on_nonfinite="raise"), nan, grads]
    with pytest.raises(GradientHealthError, match=r"step 6, first in layer backbone\.2"):
        fit(Finetune(backbone_in_optimizer=False), callbacks, steps=8, tmp_path=tmp_path,
            loader=make_loader(steps=4))  # 4 steps per epoch
    scalars = read_scalars(logdir(tmp_path))
    # Unfrozen at epoch 1 = step 4; the run raised at 6, and the numbers of that step are in the logs too.
    assert sorted(scalars["grad_norm/backbone.0"]) == [4, 5, 6]
    assert math.isnan(scalars["grad_norm/backbone.2"][6]) and math.isfinite(scalars["grad_norm/backbone.2"][5])
    assert scalars["grad_norm/total"][4] == pytest.approx(grads.total[4], rel=1e-5)
    assert grads.total[4] > scalars["grad_norm/head"][4] * 1.01  # the backbone's share is in the total


def test_detecting_a_change_of_parameters_does_not_rebuild_the_layout_every_step(monkeypatch) -> None:
    from gradmon.callbacks import _grad_source

    builds = []
    real = _grad_source.optimizer_layout
    monkeypatch.setattr(_grad_source, "optimizer_layout", lambda *a: builds.append(1) or real(*a))
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0, verbose=False)
    fit(Finetune(backbone_in_optimizer=False), [finetuning, GradHealthMonitor()], steps=12, loader=make_loader(steps=4))
    assert len(builds) == 2  # once at the start, once when the backbone's group was added


# --- several optimizers ------------------------------------------------------------------------------------------


def test_with_two_optimizers_each_layer_keeps_its_own_vanishing_streak() -> None:
    # Every layer "vanishes" at every step (threshold 100); with patience 10, each network is flagged from its own
    # 10th step on: 20 global steps = 10 steps of each, so each network's 2 layers are flagged at its 10th step.
    monitor = GradHealthMonitor(HealthRules(vanishing_threshold=100.0, exploding_threshold=1e6, depth_ratio=None),
                                on_vanishing="ignore")
    fit(GAN(), [monitor], steps=24, loader=gan_loader(12))
    flagged = sorted({(e.step, e.layer) for e in monitor.events})
    generator_steps, discriminator_steps = range(0, 24, 2), range(1, 24, 2)
    assert flagged == sorted(
        [(s, layer) for s in generator_steps[9:] for layer in ("generator.0", "generator.2")]
        + [(s, layer) for s in discriminator_steps[9:] for layer in ("discriminator.0", "discriminator.2")]
    )


def test_with_two_optimizers_exploding_patience_counts_each_layers_own_steps() -> None:
    monitor = GradHealthMonitor(HealthRules(vanishing_threshold=0.0, exploding_threshold=1e-9, exploding_patience=3,
                                            spike_factor=None, depth_ratio=None), on_exploding="ignore")
    fit(GAN(), [monitor], steps=8, loader=gan_loader(4))
    # Generator at global steps 0, 2, 4, 6: its third step is 4. Discriminator at 1, 3, 5, 7: third is 5.
    assert sorted({e.step for e in monitor.events if e.layer.startswith("generator")}) == [4, 6]
    assert sorted({e.step for e in monitor.events if e.layer.startswith("discriminator")}) == [5, 7]


def test_with_two_optimizers_each_is_logged_on_its_own_steps_with_its_own_total(tmp_path: Path) -> None:
    grads = Grads()
    fit(GAN(), [norm_monitor(log_every_n_steps=2), grads], steps=16, tmp_path=tmp_path, loader=gan_loader(8))
    scalars = read_scalars(logdir(tmp_path))
    # Every 2nd step of each optimizer: generator at global steps 0, 4, 8, 12; discriminator at 1, 5, 9, 13.
    assert sorted(scalars["grad_norm/generator.0"]) == [0, 4, 8, 12]
    assert sorted(scalars["grad_norm/discriminator.0"]) == [1, 5, 9, 13]
    assert "grad_norm/total" not in scalars
    assert sorted(scalars["grad_norm/total-Adam"]) == [0, 4, 8, 12]
    assert sorted(scalars["grad_norm/total-Adam-1"]) == [1, 5, 9, 13]
    for step, value in scalars["grad_norm/total-Adam"].items():
        assert value == pytest.approx(grads.total[step], rel=1e-5)
    for step, value in scalars["grad_norm/total-Adam-1"].items():
        assert value == pytest.approx(grads.total[step], rel=1e-5)


def test_two_optimizers_resume_their_own_step_counts(tmp_path: Path) -> None:
    t = fit(GAN(), [norm_monitor(log_every_n_steps=3)], steps=8, loader=gan_loader(8))
    t.save_checkpoint(tmp_path / "gan.ckpt")
    resumed = norm_monitor(log_every_n_steps=3)
    fit(GAN(), [resumed], steps=16, tmp_path=tmp_path, loader=gan_loader(8), ckpt_path=tmp_path / "gan.ckpt")
    scalars = read_scalars(logdir(tmp_path))
    # Each optimizer's steps 0, 3, 6 were before the checkpoint (4 steps each); its 6th step (index 6) is at global
    # step 12 for the generator and 13 for the discriminator.
    assert sorted(scalars["grad_norm/generator.0"]) == [12]
    assert sorted(scalars["grad_norm/discriminator.0"]) == [13]


# --- fp16 with a GradScaler ---------------------------------------------------------------------------------------


class ScaleLog(pl.Callback):
    """The scaler's scale before and after each step, to count the steps it skipped."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler, self.scales = scaler, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.scales.append(self.scaler.get_scale())


class NaNLossMLP(MLP):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * math.nan


def fp16_fit(monitor: GradHealthMonitor, steps: int, tmp_path: Path | None = None, nan_loss: bool = False):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows at first, as a fresh scaler does
    scales = ScaleLog(scaler)
    torch.manual_seed(0)
    model = (NaNLossMLP if nan_loss else MLP)(depth=2, lr=0.01)
    t = fit(model, [monitor, scales], steps=steps, tmp_path=tmp_path,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    return t, scales


def test_fp16_scaler_overflow_steps_are_counted_not_flagged_and_never_acted_on(tmp_path: Path) -> None:
    monitor = GradHealthMonitor(on_nonfinite="stop", on_exploding="stop", log_every_n_steps=5)
    with health_warnings() as messages:
        t, scales = fp16_fit(monitor, steps=30, tmp_path=tmp_path)
    overflows = sum(after < before for before, after in zip([2.0**40] + scales.scales, scales.scales))
    assert overflows >= 20  # 2**40 halves down to fp16's range
    assert t.global_step == 30  # not stopped
    assert monitor.amp_overflow_steps == overflows
    assert monitor.events == [] and monitor.skipped_steps == 0
    assert messages == []
    logged = read_scalars(logdir(tmp_path))["grad_health/amp_overflow_steps"]
    assert logged[25] == overflows and logged[0] == 1.0


def test_fp16_overflows_that_drive_the_scale_below_one_are_reported_once() -> None:
    monitor = GradHealthMonitor(on_nonfinite="stop")
    with health_warnings() as messages:
        t, _ = fp16_fit(monitor, steps=50, nan_loss=True)
    assert t.global_step == 50 and monitor.amp_overflow_steps == 50 and monitor.events == []
    (message,) = messages
    # 2**40 halved 41 times falls below 1 at the overflow of step 41.
    assert "skipped step 41" in message and "bf16-mixed" in message


# --- crashes in the middle of a run -----------------------------------------------------------------------------


def test_histograms_of_an_all_nan_gradient_keep_the_finite_values_and_count_the_rest(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callbacks = [PlantNaN(1), norm_monitor(log_every_n_steps=1, histogram_every_n_steps=1),
                 GradHealthMonitor(on_nonfinite="ignore")]
    fit(MLP(depth=2), callbacks, steps=2, tmp_path=tmp_path)
    acc = accumulator(logdir(tmp_path))
    assert [e.step for e in acc.Histograms("grad_hist/net.0")] == [0, 1]
    # At step 1 the layer's histogram holds its bias's 16 finite values; the weight's 256 NaNs are counted.
    (hist,) = [e for e in acc.Histograms("grad_hist/net.2") if e.step == 1]
    assert hist.histogram_value.num == 16
    counts = read_scalars(logdir(tmp_path))["grad_hist_nonfinite/net.2"]
    assert counts == {1: 16 * 16.0}


@pytest.mark.parametrize("health_first", [True, False])
def test_skip_and_histograms_log_the_same_whatever_the_callback_order(tmp_path: Path, health_first: bool) -> None:
    torch.manual_seed(0)
    health = GradHealthMonitor(on_nonfinite="skip")
    norms = norm_monitor(log_every_n_steps=1, histogram_every_n_steps=1)
    monitors = [health, norms] if health_first else [norms, health]
    fit(MLP(depth=2), [PlantNaN(1), *monitors], steps=3, tmp_path=tmp_path)
    acc = accumulator(logdir(tmp_path))
    assert [e.step for e in acc.Histograms("grad_hist/net.0")] == [0, 1, 2]
    assert health.skipped_steps == 1
    scalars = read_scalars(logdir(tmp_path))
    assert math.isnan(scalars["grad_norm/net.2"][1])
    assert scalars["update_ratio/net.0"][1] == 0.0  # the step was skipped: no update


def test_warmup_steps_zero_judges_spikes_from_the_second_step() -> None:
    class Spike(pl.Callback):
        def on_after_backward(self, trainer, pl_module) -> None:
            if trainer.global_step == 3:
                for p in pl_module.parameters():
                    p.grad.mul_(1e4)

    torch.manual_seed(0)
    monitor = GradHealthMonitor(HealthRules(warmup_steps=0, exploding_threshold=1e9), on_exploding="ignore")
    fit(MLP(depth=2), [Spike(), monitor], steps=5)
    first = monitor.events[0]
    assert (first.step, first.condition, first.rule) == (3, "exploding", "spike")


# --- names, prefixes, reuse, resume ------------------------------------------------------------------------------


def test_a_compiled_submodule_keeps_the_users_layer_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP(depth=2)
    model.net = torch.compile(model.net, backend="eager")
    monitor = GradHealthMonitor(HealthRules(vanishing_threshold=100.0, exploding_threshold=1e6, vanishing_patience=1),
                                on_vanishing="ignore")
    fit(model, [norm_monitor(log_every_n_steps=1), monitor], steps=1, tmp_path=tmp_path)
    tags = set(read_scalars(logdir(tmp_path)))
    assert {f"grad_norm/{layer}" for layer in mlp_layers(depth=2)} <= tags
    assert not any("_orig_mod" in tag for tag in tags)
    assert {e.layer for e in monitor.events} == set(mlp_layers(depth=2))


def test_a_logger_prefix_applies_to_every_tag_as_it_does_to_lightnings_own_metrics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tb = TensorBoardLogger(tmp_path, name="tb", version=0, prefix="x")
    csv = CSVLogger(tmp_path, name="csv", version=0, prefix="x")
    callbacks = [norm_monitor(log_every_n_steps=1), GradHealthMonitor(log_every_n_steps=1)]
    fit(MLP(depth=2), callbacks, steps=2, logger=[tb, csv])
    tb_tags = set(read_scalars(logdir(tmp_path)))
    csv_tags = set((tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(","))
    for tags in (tb_tags, csv_tags):
        assert {"x-grad_norm/total", "x-grad_norm/net.0", "x-grad_health/nonfinite"} <= tags
        assert not any(tag.startswith(("grad_norm", "grad_health")) for tag in tags)
    # The custom-scalars charts pick the prefixed tags.
    regex = read_layouts(logdir(tmp_path))[0].category[0].chart[0].multiline.tag[0]
    assert {t for t in tb_tags if re.fullmatch(regex, t)} == {f"x-grad_norm/{layer}" for layer in mlp_layers(depth=2)}


def test_callbacks_reused_for_a_fresh_fit_start_fresh(tmp_path: Path) -> None:
    health = GradHealthMonitor(on_nonfinite="skip")
    norms = norm_monitor(log_every_n_steps=1)
    for run in range(2):
        torch.manual_seed(run)
        with health_warnings() as messages:
            fit(MLP(depth=2), [PlantNaN(2), health, norms], steps=4, tmp_path=tmp_path / str(run))
        # The second fit's NaN is reported (not rate-limited by the first fit's), and only its own events count.
        assert len(messages) == 1
        assert [(e.step, e.layer) for e in health.events] == [(2, "net.2")]
        assert health.skipped_steps == 1 and health.flagged_steps["nonfinite"] == 1
        assert sorted(read_scalars(logdir(tmp_path / str(run)))["grad_norm/net.0"]) == [0, 1, 2, 3]


def test_a_resume_with_changed_thresholds_keeps_the_history_and_applies_the_new_thresholds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = GradHealthMonitor(HealthRules(warmup_steps=2), on_nonfinite="skip")
    t = fit(MLP(depth=2), [PlantNaN(2), first], steps=6, batches=8)
    t.save_checkpoint(tmp_path / "run.ckpt")
    resumed = GradHealthMonitor(HealthRules(warmup_steps=2, exploding_threshold=1e-9, vanishing_threshold=0.0),
                                on_nonfinite="skip", on_exploding="ignore")
    assert resumed.state_key == first.state_key
    torch.manual_seed(0)
    fit(MLP(depth=2), [resumed], steps=8, ckpt_path=tmp_path / "run.ckpt")
    assert resumed.skipped_steps == 1
    assert [(e.step, e.condition) for e in resumed.events[:1]] == [(2, "nonfinite")]
    seen = resumed.tracker.state_dict()["seen"]
    assert (seen["net.0"], seen["net.2"]) == (6 + 2, 5 + 2)  # net.2's non-finite step is not history
    assert {e.step for e in resumed.events if e.condition == "exploding"} == {6, 7}  # the new threshold applies


def test_checkpointed_state_stays_small_however_many_events(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = GradHealthMonitor(HealthRules(vanishing_threshold=100.0, exploding_threshold=1e6, vanishing_patience=1,
                                            depth_ratio=None), on_vanishing="ignore")
    t = fit(MLP(depth=6), [monitor], steps=300, batch_size=4)
    assert len(monitor.events) == 7 * 300
    state = monitor.state_dict()
    assert len(state["events"]) == EVENTS_IN_CHECKPOINT
    assert state["events"][-1]["step"] == 299
    assert len(pickle.dumps(state)) < 20_000
    t.save_checkpoint(tmp_path / "run.ckpt")
    assert (tmp_path / "run.ckpt").stat().st_size < 100_000


class FusedAdamMLP(MLP):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01, fused=True)


def test_fp16_with_an_optimizer_that_unscales_itself_logs_unscaled_norms_and_counts_overflows(tmp_path: Path) -> None:
    class Unscaled(pl.Callback):  # listed after the monitors: the gradients, still scaled, divided by the scale
        totals: dict[int, float] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            scale = trainer.precision_plugin.scaler.get_scale()
            grads = [p.grad.float() / scale for p in pl_module.parameters()]
            self.totals[trainer.global_step] = float(torch.nn.utils.get_total_norm(grads))

    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows first, then settles
    health, unscaled = GradHealthMonitor(on_nonfinite="stop"), Unscaled()
    t = fit(FusedAdamMLP(depth=2), [norm_monitor(log_every_n_steps=1), health, unscaled], steps=40,
            tmp_path=tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert t.global_step == 40 and health.events == [] and health.amp_overflow_steps >= 20
    logged = read_scalars(logdir(tmp_path))["grad_norm/total"]
    finite = [s for s, v in logged.items() if math.isfinite(v)]
    assert len(finite) >= 5
    for step in finite:
        assert logged[step] == pytest.approx(unscaled.totals[step], rel=1e-3)  # not 2**k times too large


# ------------------------------------------------------------------ parametrized layers (weight norm, spectral norm)


def test_a_parametrized_layer_is_one_layer_with_its_bias_under_its_own_name(tmp_path: Path) -> None:
    model = MLP(depth=2)
    nn.utils.parametrizations.weight_norm(model.net[0])  # g and v: net.0.parametrizations.weight.original0/1
    nn.utils.parametrizations.spectral_norm(model.net[2])  # net.2.parametrizations.weight.original
    grads, health = Grads(), GradHealthMonitor()
    fit(model, [norm_monitor(log_every_n_steps=2), health, grads], steps=4, tmp_path=tmp_path)
    scalars = read_scalars(logdir(tmp_path))
    layers = sorted(t.split("/", 1)[1] for t in scalars if t.startswith("grad_norm/") and t != "grad_norm/total")
    assert layers == ["net.0", "net.2", "net.4"]  # no "net.0.parametrizations.weight"
    for step, value in scalars["grad_norm/net.0"].items():
        g = grads.named[step]
        expected = torch.linalg.vector_norm(torch.cat([g[n].double().reshape(-1) for n in (
            "net.0.bias", "net.0.parametrizations.weight.original0", "net.0.parametrizations.weight.original1")]))
        assert value == pytest.approx(expected.item(), rel=1e-5)
    assert sorted(scalars["grad_norm/net.2"]) == [0, 2]
    assert set(health.tracker.state_dict()["seen"]) == {"net.0", "net.2", "net.4"}
    assert health.events == []
