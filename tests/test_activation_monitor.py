"""ActivationMonitor in real Trainer runs: what it logs and when, hooks that live for the logging batch only, a run
that ends bit-identical, the findings it names (dead units, a learning rate far too high), the line
the diagnosis board gives a health warning, and compiled modules."""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    MLP,
    PlantNaN,
    accumulator,
    fit,
    logdir,
    make_loader,
    no_sync,
    rank_loader,
    read_layouts,
    read_scalars,
)
from torch import nn

from gradmon import ActivationMonitor, GradHealthMonitor, GradNormMonitor, WeightInit, tags
from gradmon.activations import ActivationRecorder
from gradmon.callbacks._diagnosis import diagnosis_board

pytestmark = pytest.mark.filterwarnings("ignore::gradmon.GradientHealthWarning")


def module_hooks(model: nn.Module) -> int:
    return sum(
        len(hooks) for m in model.modules()
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
    )


class CountHooks(pl.Callback):
    """Listed after the monitor: the module hooks in place while each step's forward and backward ran (seen before
    the optimizer step), and once each batch is over."""

    def __init__(self) -> None:
        self.during: dict[int, int] = {}
        self.after: dict[int, int] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.during[trainer.global_step] = module_hooks(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after[trainer.global_step - 1] = module_hooks(pl_module)


def test_hooks_live_for_the_logging_batches_only(tmp_path: Path) -> None:
    counts = CountHooks()
    fit(MLP(depth=2), [ActivationMonitor(log_every_n_steps=3), counts], steps=7, tmp_path=tmp_path)
    observed = len(MLP(depth=2).net)  # 2 hidden Linear + 2 ReLU + the head
    assert counts.during == {0: observed, 1: 0, 2: 0, 3: observed, 4: 0, 5: 0, 6: observed}
    assert set(counts.after.values()) == {0}


def test_statistics_are_logged_at_the_logging_steps_and_equal_the_batchs_own(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP(depth=2, activation="tanh")
    start = copy.deepcopy(model)
    loader = make_loader(16, 5)
    fit(model, [ActivationMonitor(log_every_n_steps=2)], steps=5, tmp_path=tmp_path, loader=loader)
    scalars = read_scalars(logdir(tmp_path))
    assert set(scalars[tags.tag(tags.ACTIVATION_RMS, "net.0")]) == {0, 2, 4}
    # Step 0's numbers, by hand: the first batch through the model as it started.
    x, y = next(iter(loader))
    recorder = ActivationRecorder(start)
    with recorder:
        nn.functional.cross_entropy(start(x), y).backward()
    for s in recorder.stats():
        assert scalars[tags.tag(tags.ACTIVATION_RMS, s.name)][0] == pytest.approx(s.rms, rel=1e-6)
        assert scalars[tags.tag(tags.ACTIVATION_RMS_LOG10, s.name)][0] == pytest.approx(math.log10(s.rms), rel=1e-6)
        assert scalars[tags.tag(tags.ACTIVATION_GRAD_RMS, s.name)][0] == pytest.approx(s.grad_rms, rel=1e-6)
    tanh = recorder.stats()[3]
    assert scalars[tags.tag(tags.SATURATED_FRACTION, "net.3")][0] == pytest.approx(tanh.saturated_fraction)
    assert scalars[tags.tag(tags.ACTIVATION_SLOPE, "net.3")][0] == pytest.approx(tanh.slope, rel=1e-6)
    assert not any(t.startswith(tags.DEAD_FRACTION) for t in scalars)  # no ReLU in a tanh net


def test_the_run_is_bit_identical_with_the_monitor(tmp_path: Path) -> None:
    weights = []
    for callbacks in ([], [ActivationMonitor(log_every_n_steps=1), GradNormMonitor(log_every_n_steps=1)]):
        torch.manual_seed(0)
        model = MLP(depth=3, optimizer="adam", lr=0.01)
        fit(model, callbacks, steps=6, tmp_path=tmp_path / str(len(callbacks)))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_layout_charts_every_statistic_beside_gradnormmonitors_charts(tmp_path: Path) -> None:
    fit(MLP(depth=2), [GradNormMonitor(log_every_n_steps=1), ActivationMonitor(log_every_n_steps=1)], steps=3,
        tmp_path=tmp_path)
    last = read_layouts(logdir(tmp_path))[-1]  # TensorBoard shows a run's last layout
    charts = {chart.title: chart.multiline.tag[0] for category in last.category for chart in category.chart}
    assert charts["log10 activation RMS by module"] == rf"{tags.ACTIVATION_RMS_LOG10}/.*"
    assert charts["dead fraction by module"] == rf"{tags.DEAD_FRACTION}/.*"
    assert charts["log10 gradient norm by layer"] == rf"{tags.GRAD_NORM_LOG10}/.*"
    logged = read_scalars(logdir(tmp_path))
    assert {t for t in logged if re.fullmatch(charts["activation RMS by module"], t)} == {
        tags.tag(tags.ACTIVATION_RMS, f"net.{i}") for i in range(5)
    }


def test_dead_units_behind_a_large_negative_bias_are_named_in_a_finding_and_in_tensorboard(tmp_path: Path) -> None:
    model = MLP(depth=3, init="kaiming")
    with torch.no_grad():
        model.net[2].bias.fill_(-20.0)
    monitor = ActivationMonitor(log_every_n_steps=2)
    fit(model, [monitor], steps=3, tmp_path=tmp_path)
    finding = monitor.found["dead_relu"]
    assert finding.condition == "dead_units" and finding.step == 0 and finding.layers[0] == "net.3"
    assert "the biases of net.2 are negative (mean -20, -20 at the start)" in finding.explanation
    assert read_scalars(logdir(tmp_path))[tags.tag(tags.DEAD_FRACTION, "net.3")][0] == 1.0
    (event,) = accumulator(logdir(tmp_path)).Tensors(f"{tags.DIAGNOSIS}/dead_units/text_summary")
    assert event.step == 0 and b"dead ReLUs" in event.tensor_proto.string_val[0]


def test_adam_at_a_learning_rate_of_10_is_found_diverging_after_its_first_step_not_at_it(tmp_path: Path) -> None:
    monitor = ActivationMonitor(log_every_n_steps=1)
    fit(MLP(depth=3, init="kaiming", optimizer="adam", lr=10.0), [monitor], steps=3)
    finding = monitor.found["lr_too_high"]
    assert finding.step == 1  # step 0 moved every weight by about lr, whatever lr: no evidence either way
    assert finding.numbers["weight RMS change since start"] > 2
    assert finding.fix["lr"] < 1.0 and "Adam moves each weight by about lr = 10" in finding.explanation
    assert monitor.verdict.finding is finding


class AskAtStep(pl.Callback):
    """Asks the diagnosis board where GradHealthMonitor warns: before the optimizer step of ``step``."""

    def __init__(self, step: int, condition: str, layers: list[str]) -> None:
        self.step, self.condition, self.layers = step, condition, layers
        self.answer: str | None = "not asked"

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            self.answer = diagnosis_board(trainer).explain(trainer, self.condition)


def test_likely_cause_is_one_line_from_the_monitor_for_a_vanishing_sigmoid_net() -> None:
    ask = AskAtStep(4, "vanishing", ["net.0"])
    fit(MLP(depth=8, width=32, activation="sigmoid"), [ask, ActivationMonitor(log_every_n_steps=2)], steps=5)
    assert ask.answer.startswith("likely cause (found at step 0 from the signal measured through the layers")
    assert ": saturating activation: Sigmoid's slope is at most 0.25" in ask.answer
    assert "; try: a non-saturating activation" in ask.answer and "\n" not in ask.answer


def test_likely_cause_reads_the_step_being_observed_before_its_optimizer_step() -> None:
    # Asked before the monitor's own hooks ran for step 0: nothing observed had reached the host yet.
    ask = AskAtStep(0, "exploding", ["net.0"])
    fit(MLP(depth=6, width=32, init="normal1"), [ask, ActivationMonitor(log_every_n_steps=5)], steps=1)
    assert ask.answer.startswith("likely cause (found at step 0 from the signal measured through the layers")
    assert ": init scale too large: weights initialised at RMS 1" in ask.answer
    assert "multiplies the forward signal by" in ask.answer


def test_likely_cause_without_a_monitor_predicts_from_the_weights() -> None:
    ask = AskAtStep(1, "vanishing", ["net.0"])
    fit(MLP(depth=8, width=32, activation="relu"), [WeightInit("normal(std=0.01)", seed=0, verbose=False), ask],
        steps=2)
    assert ask.answer.startswith("likely cause (found at step 1 from the weights and gradient norms")
    assert ": init scale too small: weights initialised at RMS 0.01" in ask.answer
    assert "(initialised normal(std=0.01))" in ask.answer and "predicted" in ask.answer


def test_likely_cause_names_the_first_non_finite_layer_and_nothing_for_a_healthy_net() -> None:
    nonfinite = AskAtStep(2, "nonfinite", ["net.2"])
    healthy = AskAtStep(1, "vanishing", ["net.0"])
    fit(MLP(depth=3, init="kaiming"), [nonfinite, healthy, PlantNaN(2), ActivationMonitor(log_every_n_steps=1)],
        steps=3)
    assert nonfinite.answer.startswith("likely cause (found at step 2 from where the non-finite values first appear)")
    assert "first non-finite gradient in net.2" in nonfinite.answer
    assert healthy.answer is None


def test_a_compiled_submodule_is_observed_as_one_module_under_its_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP(depth=2)
    model.net = torch.compile(model.net, backend="eager")
    fit(model, [ActivationMonitor(log_every_n_steps=1)], steps=3, tmp_path=tmp_path)
    scalars = read_scalars(logdir(tmp_path))
    assert [t for t in scalars if t.startswith(f"{tags.ACTIVATION_RMS}/")] == [tags.tag(tags.ACTIVATION_RMS, "net")]
    assert set(scalars[tags.tag(tags.ACTIVATION_GRAD_RMS, "net")]) == {0, 1, 2}
    assert module_hooks(model) == 0


def test_a_module_compiled_as_a_whole_is_said_to_have_nothing_to_observe(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = ActivationMonitor(log_every_n_steps=1)
    with pytest.warns(UserWarning, match="compiled as a whole"):
        fit(torch.compile(MLP(depth=2), backend="eager"), [monitor], steps=2, tmp_path=tmp_path)
    assert not any(t.startswith("activation") for t in read_scalars(logdir(tmp_path)))


def test_gradient_accumulation_observes_the_first_micro_batch_of_each_logging_step(tmp_path: Path) -> None:
    counts = CountHooks()
    fit(MLP(depth=2), [ActivationMonitor(log_every_n_steps=2), counts], steps=3, batches=6, tmp_path=tmp_path,
        accumulate_grad_batches=2)
    assert set(read_scalars(logdir(tmp_path))[tags.tag(tags.ACTIVATION_RMS, "net.0")]) == {0, 2}
    assert counts.during == {0: 0, 1: 0, 2: 0}  # removed after the first micro-batch, before the optimizer step


def test_the_findings_are_printed_at_the_end_of_fit(caplog: pytest.LogCaptureFixture) -> None:
    model = MLP(depth=3, init="kaiming", optimizer="adam", lr=10.0)
    with caplog.at_level("INFO"):
        fit(model, [ActivationMonitor(log_every_n_steps=1)], steps=2)
    assert "ActivationMonitor diagnosis" in caplog.text and "learning rate too high" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"log_every_n_steps": 0}, ValueError, r"`log_every_n_steps=0` is not valid: expected an integer in \[1,"),
        ({"log_every_n_steps": 2.0}, ValueError, "log_every_n_steps=2.0"),
        ({"diagnose": "yes"}, TypeError, "`diagnose='yes'` is not valid: expected True or False"),
        ({"summary": 1}, TypeError, "`summary=1`"),
    ],
)
def test_arguments_are_checked_where_they_are_written(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        ActivationMonitor(**kwargs)


def test_health_monitor_and_activation_monitor_run_together(tmp_path: Path) -> None:
    fit(MLP(depth=2), [GradHealthMonitor(), ActivationMonitor(log_every_n_steps=2)], steps=3, tmp_path=tmp_path)
    assert tags.tag(tags.ACTIVATION_RMS, "net.0") in read_scalars(logdir(tmp_path))


DDP_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
from lightning.pytorch.strategies import DDPStrategy
from helpers import MLP, fit, rank_loader
from gradmon import ActivationMonitor

torch.manual_seed(0)
monitor = ActivationMonitor(log_every_n_steps=1)
rank = int(os.environ.get("LOCAL_RANK", 0))
fit(MLP(), [monitor], steps=2, tmp_path={out!r} if rank == 0 else None, loader=rank_loader(rank, 16, 2), devices=2,
    strategy=DDPStrategy(), use_distributed_sampler=False)
torch.save({{"found": sorted(monitor.found)}}, os.path.join({out!r}, f"rank{{rank}}.pt"))
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow  # 2 processes
def test_under_ddp_rank_0_logs_the_statistics_of_its_own_batch(tmp_path: Path) -> None:
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    scalars = read_scalars(logdir(tmp_path))
    torch.manual_seed(0)
    model = MLP()
    for rank in (0, 1):  # step 0's statistics by hand, from each rank's first batch through the initial model
        x, y = next(iter(rank_loader(rank, 16, 2)))
        recorder = ActivationRecorder(model)
        with recorder:
            nn.functional.cross_entropy(model(x), y).backward()
        logged = [scalars[tags.tag(tags.ACTIVATION_RMS, s.name)][0] == pytest.approx(s.rms, rel=1e-6)
                  for s in recorder.stats()]
        assert all(logged) is (rank == 0)
        model.zero_grad()
    assert all(torch.load(tmp_path / f"rank{r}.pt")["found"] == [] for r in (0, 1))


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_a_resumed_run_keeps_the_history_and_the_initial_weights_the_diagnosis_reads(tmp_path: Path) -> None:
    first = ActivationMonitor(log_every_n_steps=1)
    trainer = fit(MLP(depth=2), [first], steps=2)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = ActivationMonitor(log_every_n_steps=1)
    fit(MLP(depth=2), [resumed], steps=4, ckpt_path=tmp_path / "last.ckpt")
    before, after = first.state_dict()["board"], resumed.state_dict()["board"]
    assert [record[0] for record in after["history"]] == [0, 1, 2, 3]
    assert after["history"][:2] == before["history"]
    assert math.isfinite(after["history"][0][2])  # the step's loss
    assert after["initial_weight_rms"] == before["initial_weight_rms"] and set(after["initial_weight_rms"]) == {
        "net.0", "net.2", "net.4"}


class SyncCheckedMLP(MLP):
    """The forward (where the monitor's forward hooks run) and the backward (its tensor hooks) under CUDA's sync debug
    mode set to error: any implicit device sync raises."""

    def training_step(self, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return super().training_step(batch, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def backward(self, loss, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss.backward(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_no_hook_syncs_the_device_and_the_numbers_arrive_one_step_later() -> None:
    # The hooks that only launch work.
    monitor = no_sync(ActivationMonitor(log_every_n_steps=2), ("on_train_batch_start", "on_before_optimizer_step"))
    torch.manual_seed(0)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=5, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[monitor])
    trainer.fit(SyncCheckedMLP(depth=3, init="normal1"), make_loader(16, 5))
    assert monitor.found["init_too_large"].step == 0


def test_the_verdict_is_written_even_when_a_health_warning_formed_it_first(tmp_path: Path) -> None:
    # GradHealthMonitor warns at step 0, before the monitor's report of step 0: the warning forms the verdict.
    fit(MLP(depth=6, width=32, init="normal1"), [GradHealthMonitor(on_exploding="stop"),
                                                 ActivationMonitor(log_every_n_steps=1)], steps=3, tmp_path=tmp_path)
    (event,) = accumulator(logdir(tmp_path)).Tensors(f"{tags.DIAGNOSIS}/{tags.VERDICT}/text_summary")
    assert event.step == 0 and b"**Verdict** (found at step 0" in event.tensor_proto.string_val[0]
    assert b"init scale too large" in event.tensor_proto.string_val[0]
