"""GradHealthMonitor in real Trainer runs: classification of deep nets, planted faults, actions, logging, resume."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import helpers
import lightning.pytorch as pl
import pytest
import torch
from helpers import MLP, PlantNaN, health_warnings, logdir, read_scalars
from torch import nn

from gradmon import GradHealthMonitor, GradientHealthError, GradientHealthWarning, GradNormMonitor
from gradmon.health import HealthRules

fit = functools.partial(helpers.fit, batch_size=32)


# --- classification with defaults -------------------------------------------------------------------------------


def deep(activation: str, init: str | None) -> MLP:
    torch.manual_seed(0)
    return MLP(depth=10, width=32, in_features=16, activation=activation, init=init)


def test_defaults_flag_a_deep_sigmoid_mlp_with_default_init_as_vanishing() -> None:
    monitor = GradHealthMonitor(on_vanishing="ignore")
    fit(deep("sigmoid", None), [monitor], steps=30)
    vanishing = [e for e in monitor.events if e.condition == "vanishing"]
    assert vanishing and {e.condition for e in monitor.events} == {"vanishing"}
    # Flagged once the patience (10 steps) has run out, and the first layer is the most starved.
    assert vanishing[0].step == 9
    assert "net.0" in {e.layer for e in vanishing if e.step == 9}
    assert "net.20" not in {e.layer for e in vanishing}  # the head is where the gradient is


def test_defaults_leave_a_deep_kaiming_relu_mlp_unflagged() -> None:
    monitor = GradHealthMonitor(on_vanishing="raise", on_exploding="raise", on_nonfinite="raise")
    t = fit(deep("relu", "kaiming"), [monitor], steps=60)
    assert t.global_step == 60
    assert monitor.events == [] and monitor.skipped_steps == 0


def test_defaults_flag_a_deep_relu_mlp_initialised_standard_normal_as_exploding_at_step_0() -> None:
    monitor = GradHealthMonitor(on_exploding="ignore", on_nonfinite="ignore")
    fit(deep("relu", "normal1"), [monitor], steps=3)
    first = monitor.events[0]
    assert (first.step, first.condition) == (0, "exploding")
    assert first.value > 1e4


class NormedNet(MLP):
    """A healthy net whose biases feed a BatchNorm (Linear -> BatchNorm1d -> ReLU twice, then a head: repro 09), or
    with ``conv``, Conv2d -> BatchNorm2d -> ReLU twice, pooled, then a head. Either way ``net.0.bias`` and
    ``net.3.bias`` have an exact gradient of zero, which rounding leaves at about 1e-8 to 1e-6."""

    def __init__(self, conv: bool = False) -> None:
        super().__init__(in_features=16, optimizer="adam", lr=1e-3)
        torch.manual_seed(0)
        if conv:
            self.net = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
            )
        else:
            self.net = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64),
                                     nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(-1, 1, 4, 4) if self.conv else x)


@pytest.mark.parametrize("conv", [False, True], ids=["linear-batchnorm1d", "conv-batchnorm2d"])
def test_a_bias_feeding_batchnorm_is_not_flagged_vanishing_per_parameter_and_the_summary_says_why(
    conv: bool, caplog
) -> None:
    import logging

    model = NormedNet(conv)
    norms = GradNormMonitor(group_by="parameter", log_every_n_steps=1)
    monitor = GradHealthMonitor(HealthRules(vanishing_patience=1), group_by="parameter", on_vanishing="raise")
    with health_warnings() as messages, caplog.at_level(logging.INFO):
        fit(model, [norms, monitor], steps=30)
    assert messages == [] and monitor.events == [] and not monitor.flagged_steps
    assert monitor.tracker.cancelled == {"net.0.bias": 0, "net.3.bias": 0}
    assert (
        "gradmon: not judged vanishing: net.0.bias (from step 0), net.3.bias (from step 0). Their gradients are over "
        "100x below another parameter of their layer: cancelled by construction, as for a bias followed by a "
        "BatchNorm" in caplog.text
    )
    # Without the rule the same run is flagged at its first step, by the threshold rule, naming both biases.
    model = NormedNet(conv)
    off = GradHealthMonitor(HealthRules(vanishing_patience=1, sibling_ratio=None), group_by="parameter",
                            on_vanishing="ignore")
    fit(model, [off], steps=3)
    first = [(e.layer, e.rule) for e in off.events if e.step == 0]
    assert first == [("net.0.bias", "threshold"), ("net.3.bias", "threshold")]


def test_per_parameter_a_deep_sigmoid_mlp_still_has_its_weights_and_biases_flagged_vanishing() -> None:
    monitor = GradHealthMonitor(group_by="parameter", on_vanishing="ignore")
    fit(deep("sigmoid", None), [monitor], steps=12)
    flagged = {e.layer for e in monitor.events if e.step == 9}
    assert {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"} <= flagged
    assert monitor.tracker.cancelled == {}


# --- planted faults ---------------------------------------------------------------------------------------------


def test_a_nan_planted_in_one_layer_is_flagged_at_that_step_naming_that_layer() -> None:
    torch.manual_seed(0)
    monitor = GradHealthMonitor(on_nonfinite="skip")  # "warn" would let the NaN into the weights
    with health_warnings() as messages:
        fit(MLP(depth=3), [PlantNaN(4), monitor], steps=6)
    assert [(e.step, e.layer, e.condition) for e in monitor.events] == [(4, "net.2", "nonfinite")]
    (message,) = messages
    assert "step 4" in message and "first in layer net.2" in message


def test_a_nan_spreading_backwards_is_named_by_the_first_layer_in_registration_order() -> None:
    torch.manual_seed(0)
    model = MLP(depth=3)
    # NaN in the activation after net.2: the gradients of net.2 and net.0 turn NaN, net.4 and the head stay finite.
    model.net[3].register_full_backward_hook(
        lambda m, gin, gout: (torch.full_like(gin[0], math.nan),) if model.trainer.global_step == 1 else None
    )
    monitor = GradHealthMonitor(on_nonfinite="raise")
    with pytest.raises(GradientHealthError, match=r"step 1, first in layer net\.0") as info:
        fit(model, [monitor], steps=3)
    assert "net.2" in str(info.value) and "net.4" not in str(info.value)


class Snapshot(pl.Callback):
    """Weights and optimizer state before and after one step."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before = self.after = None

    @staticmethod
    def _take(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict, dict]:
        return copy.deepcopy(pl_module.state_dict()), copy.deepcopy(trainer.optimizers[0].state_dict())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.before = self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.before is not None and self.after is None:
            self.after = self._take(trainer, pl_module)


def assert_same_state(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (wa, oa), (wb, ob) = a, b
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)


def test_skip_leaves_weights_and_adam_state_exactly_as_before_the_faulty_step() -> None:
    torch.manual_seed(0)
    model = MLP(depth=3, optimizer="adam", lr=1e-2)
    faulty, healthy = Snapshot(step=3), Snapshot(step=2)
    monitor = GradHealthMonitor(on_nonfinite="skip")
    with health_warnings() as messages:
        t = fit(model, [PlantNaN(3), monitor, faulty, healthy], steps=6)
    assert_same_state(faulty.before, faulty.after)
    with pytest.raises(AssertionError):  # a normal step does change them: the check above can fail
        assert_same_state(healthy.before, healthy.after)
    assert faulty.before[1]["state"][0]["step"] == 3  # Adam's step count did not advance either
    assert monitor.skipped_steps == 1 and t.global_step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "skipped" in messages[0]


def test_stop_ends_the_run_gracefully_after_the_flagged_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = GradHealthMonitor(on_nonfinite="stop")
    with pytest.warns(GradientHealthWarning, match="Stopping the run"):
        t = fit(MLP(depth=3), [PlantNaN(2, layer="net.0"), monitor], steps=20, tmp_path=tmp_path,
                enable_checkpointing=True)
    assert t.global_step == 3 and t.should_stop
    assert list((logdir(tmp_path) / "checkpoints").glob("*.ckpt"))  # checkpointing finished normally


def test_raise_puts_the_details_in_the_error() -> None:
    torch.manual_seed(0)
    with pytest.raises(GradientHealthError, match=r"exploding gradients at step 0 in \d+ layer\(s\): net\.0 \(norm"):
        fit(deep("relu", "normal1"), [GradHealthMonitor(on_exploding="raise")], steps=3)


def test_warnings_are_rate_limited_but_the_first_of_each_condition_is_always_reported() -> None:
    torch.manual_seed(0)
    monitor = GradHealthMonitor(on_nonfinite="skip", warn_every_n_steps=5)
    with health_warnings() as messages:
        fit(MLP(depth=3), [PlantNaN(1, 2, 3, 9), monitor], steps=12)
    assert [m.split(",")[0] for m in messages] == [
        "gradmon: non-finite gradients at step 1",
        "gradmon: non-finite gradients at step 9",
    ]
    assert "(2 more nonfinite steps since the last report.)" in messages[1]
    assert [e.step for e in monitor.events] == [1, 2, 3, 9]


# --- logging, sharing, resume -----------------------------------------------------------------------------------


def test_counts_are_logged_at_logging_steps_and_at_flagged_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fit(MLP(depth=3), [PlantNaN(3), GradHealthMonitor(on_nonfinite="skip", log_every_n_steps=4)], steps=9,
        tmp_path=tmp_path)
    scalars = read_scalars(logdir(tmp_path))
    assert scalars["grad_health/nonfinite"] == {0: 0.0, 3: 1.0, 4: 0.0, 8: 0.0}
    assert scalars["grad_health/skipped_steps"] == {0: 0.0, 3: 1.0, 4: 1.0, 8: 1.0}
    assert set(scalars["grad_health/vanishing"]) == {0, 3, 4, 8}


def test_norms_are_computed_once_per_step_when_both_monitors_are_attached(
    tmp_path: Path, norm_computations: list[float]
) -> None:
    torch.manual_seed(0)
    fit(MLP(depth=3), [GradHealthMonitor(), GradNormMonitor(log_every_n_steps=1)], steps=5, tmp_path=tmp_path)
    assert norm_computations == [2.0] * 5  # not 10: both monitors log every step from one computation


def test_a_monitor_with_another_norm_type_is_not_shared(tmp_path: Path, norm_computations: list[float]) -> None:
    torch.manual_seed(0)
    fit(MLP(depth=3), [GradNormMonitor(norm_type="inf", log_every_n_steps=1), GradHealthMonitor()], steps=2,
        tmp_path=tmp_path)
    # Each step, GradNormMonitor's inf-norms, and GradHealthMonitor's own 2-norms.
    assert norm_computations == [math.inf, 2.0] * 2


def test_history_survives_a_resume_from_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = GradHealthMonitor(HealthRules(warmup_steps=2))
    t = fit(MLP(depth=3), [monitor], steps=6)
    path = tmp_path / "run.ckpt"
    t.save_checkpoint(path)
    resumed = GradHealthMonitor(HealthRules(warmup_steps=2))
    torch.manual_seed(0)
    fit(MLP(depth=3), [resumed], steps=8, ckpt_path=path)
    state = torch.load(path, weights_only=False)["callbacks"][monitor.state_key]
    assert state["tracker"]["seen"]["net.0"] == 6
    assert resumed.tracker.state_dict()["seen"]["net.0"] == 8  # 6 restored + 2 new steps


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"on_vanishing": "skip"}, "on_vanishing"),
        ({"on_exploding": "explode"}, "on_exploding"),
        ({"on_nonfinite": None}, "on_nonfinite"),
        ({"norm_type": 0}, "norm_type"),
        ({"warn_every_n_steps": 0}, "warn_every_n_steps"),
        ({"group_by": "module"}, "group_by"),
    ],
)
def test_bad_arguments_raise_in_the_constructor(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}="):
        GradHealthMonitor(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"vanishing_threshold": -1e-3}, "vanishing_threshold"),
        ({"vanishing_threshold": 1.0, "exploding_threshold": 0.5}, "vanishing_threshold"),
    ],
)
def test_bad_rules_raise_where_they_are_written(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}="):
        GradHealthMonitor(HealthRules(**kwargs))


def test_a_warning_and_the_summary_end_with_the_likely_cause(caplog) -> None:
    import logging

    with health_warnings() as messages, caplog.at_level(logging.INFO):
        fit(deep("sigmoid", None), [GradHealthMonitor()], steps=12)
    assert messages and "Likely cause (found at step 9 from the weights and gradient norms" in messages[0]
    assert "): saturating activation: Sigmoid's slope is at most 0.25" in messages[0] and "try:" in messages[0]
    assert "vanishing: likely cause (found at step 9" in caplog.text
    assert "): saturating activation: " in caplog.text
    with health_warnings() as quiet:
        fit(deep("sigmoid", None), [GradHealthMonitor(diagnose=False)], steps=12)
    assert quiet and "Likely cause" not in quiet[0]


def test_the_checkpointed_state_keeps_the_keys_older_checkpoints_have() -> None:
    monitor = GradHealthMonitor()
    fit(MLP(depth=2), [monitor], steps=2)
    old_keys = {"tracker", "skipped_steps", "amp_overflow_steps", "optimizer_steps", "flagged_steps", "first_step",
                "layer_counts", "last_report", "events"}
    assert set(monitor.state_dict()) == old_keys
    # A checkpoint from before amp_overflow_steps and optimizer_steps were kept still loads.
    older = {k: v for k, v in monitor.state_dict().items() if k not in ("amp_overflow_steps", "optimizer_steps")}
    GradHealthMonitor().load_state_dict(older)


def test_no_callback_module_imports_another() -> None:
    import ast

    import gradmon.callbacks

    folder = Path(gradmon.callbacks.__file__).parent
    public = {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")}
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                assert name.split(".")[-1] not in public - {path.stem} or not name.startswith("gradmon"), (path, name)
