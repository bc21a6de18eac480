"""Checks that need a CUDA GPU (skipped without one; run by scripts/gpu_check.sh on a machine that has one).

- No gradmon hook syncs the device on the steps that must not: every hook of GradHealthMonitor(sync_free=True) and
  GradNormMonitor runs under ``torch.cuda.set_sync_debug_mode("error")`` (Lightning's own code may sync elsewhere;
  only gradmon's hooks are wrapped).
- The sync-free skip on CUDA: fused Adam with ``found_inf`` leaves weights and state untouched.
- fp16 with a GradScaler and bf16 runs; GradCheck's CUDA RNG fork; WeightInit's draw on the generator's device;
  Lightning's FSDPStrategy and ModelParallelStrategy with one device.
"""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import MLP, PlantNaN, ShardedMLP, make_loader, no_sync, read_scalars

from gradmon import GradCheck, GradHealthMonitor, GradNormMonitor, WeightInit

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"),
]


class FusedMLP(MLP):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


def gpu_trainer(steps: int, callbacks: list, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="gpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False)
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def test_sync_free_health_and_norm_monitor_hooks_never_sync_the_device(tmp_path, monkeypatch) -> None:
    # A reported warning's diagnosis (diagnose=True) reads the weights: the one sync allowed, once per warning issued
    # (the end-of-fit summary reads the verdict already formed, on the host).
    from gradmon.callbacks._diagnosis import DiagnosisBoard

    diagnosed = []

    def explain(self, *args, _explain=DiagnosisBoard.explain):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            diagnosed.append(_explain(self, *args))
            return diagnosed[-1]
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(DiagnosisBoard, "explain", explain)
    torch.manual_seed(0)
    health = no_sync(GradHealthMonitor(on_nonfinite="skip", on_exploding="skip", sync_free=True))
    # Logging steps read their numbers one step later from pinned memory: no step may sync.
    norms = no_sync(GradNormMonitor(log_every_n_steps=5))
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    t = gpu_trainer(20, [PlantNaN(7, element=(0, 0)), health, norms], logger=logger)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(FusedMLP(depth=4, width=64), make_loader(batch_size=64, steps=20))
    assert t.global_step == 20
    assert [(e.step, e.condition) for e in health.events] == [(7, "nonfinite")]
    assert health.skipped_steps == 1
    assert len(diagnosed) == 1  # the warning's, and it ran (a failure warns):
    assert not [w for w in caught if "diagnosis failed" in str(w.message)]


def test_fused_adam_skip_on_cuda_leaves_weights_and_state_exactly_as_before() -> None:
    class Snap(pl.Callback):
        states = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.states[trainer.global_step] = (copy.deepcopy(pl_module.state_dict()),
                                                copy.deepcopy(trainer.optimizers[0].state_dict()))

    torch.manual_seed(0)
    snap = Snap()
    gpu_trainer(5, [PlantNaN(2, element=(0, 0)), GradHealthMonitor(on_nonfinite="skip", sync_free=True), snap]).fit(
        FusedMLP(depth=2), make_loader(steps=5))
    (w2, o2), (w3, o3) = snap.states[2], snap.states[3]
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert all(torch.equal(v, o3["state"][i][k]) for i in o2["state"] for k, v in o2["state"][i].items())


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_runs_with_both_monitors(precision: str) -> None:
    torch.manual_seed(0)
    health, norms = GradHealthMonitor(on_nonfinite="stop"), GradNormMonitor(log_every_n_steps=1)
    t = gpu_trainer(10, [health, norms], precision=precision)
    t.fit(MLP(depth=3), make_loader(steps=10))
    assert t.global_step == 10 and health.events == []


def test_grad_check_forks_and_restores_the_cuda_rng() -> None:
    class RNG(pl.Callback):
        def __init__(self) -> None:
            self.states = []

        def on_train_batch_start(self, trainer, *args) -> None:
            self.states.append(torch.cuda.get_rng_state())

    torch.manual_seed(0)
    before, check, after = RNG(), GradCheck(every_n_steps=1, check_at_start=False), RNG()
    gpu_trainer(3, [before, check, after]).fit(MLP(depth=2, activation="tanh"), make_loader(steps=3))
    assert check.results and all(r.passed for r in check.results)
    assert all(torch.equal(a, b) for a, b in zip(before.states, after.states))  # the check ran between them


def test_weight_init_draws_the_same_weights_on_cuda_as_on_cpu() -> None:
    from gradmon.init import initialize

    cpu, gpu = MLP(depth=2), MLP(depth=2).cuda()
    initialize(cpu, "kaiming_normal", generator=torch.Generator().manual_seed(3))
    initialize(gpu, "kaiming_normal", generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu.parameters(), gpu.parameters()))
    init = WeightInit("orthogonal", seed=5)
    gpu_trainer(1, [init]).fit(MLP(depth=2), make_loader(steps=1))
    assert len(init.records) == 3


def test_fsdp_and_model_parallel_strategies_log_the_norms_of_a_plain_run(tmp_path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    logged = {}
    for name, strategy, model in (("plain", "auto", MLP), ("fsdp", FSDPStrategy(), MLP),
                                  ("model_parallel", ModelParallelStrategy(), ShardedMLP)):
        torch.manual_seed(0)
        norms, health = GradNormMonitor(log_every_n_steps=1), GradHealthMonitor()
        logger = pl.loggers.TensorBoardLogger(tmp_path, name=name, version=0)
        # One device: the same batches in the same order as the plain run (no distributed sampler's reordering).
        t = gpu_trainer(3, [norms, health], strategy=strategy, logger=logger, use_distributed_sampler=False)
        t.fit(model(depth=2), make_loader(steps=3))
        assert t.global_step == 3 and health.events == [], name
        logger.experiment.flush()
        logged[name] = {tag: v for tag, v in read_scalars(tmp_path / name / "version_0").items()
                        if tag.startswith("grad_norm/")}
    plain = logged["plain"]
    assert {"grad_norm/net.0", "grad_norm/net.2", "grad_norm/net.4"} <= set(plain)
    assert all(sorted(steps) == [0, 1, 2] for steps in plain.values())
    for name in ("fsdp", "model_parallel"):
        assert set(logged[name]) == set(plain), name
        for tag, steps in plain.items():
            for step, value in steps.items():
                assert logged[name][tag][step] == pytest.approx(value, rel=1e-4), (name, tag, step)


def test_host_copies_reuse_pinned_buffers_and_keep_what_they_read() -> None:
    from gradmon.callbacks._host_copy import _PINNED, HostCopy

    vector = torch.arange(5.0, device="cuda")
    first = HostCopy(vector)
    assert first.values() == [0.0, 1.0, 2.0, 3.0, 4.0]
    buffer, event = _PINNED[(vector.device, vector.dtype, (5,))][-1]
    assert buffer.is_pinned()
    second = HostCopy(vector * 2)
    assert second._buffer is buffer and second._event is event  # reused, not allocated again
    assert second.values() == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert first.values() == [0.0, 1.0, 2.0, 3.0, 4.0]  # what it read, not the reused buffer's new content
    in_flight = [HostCopy(vector + i) for i in range(3)]  # several at once: each its own buffer
    assert len({id(c._buffer) for c in in_flight}) == 3
    assert [c.values()[0] for c in in_flight] == [0.0, 1.0, 2.0]
