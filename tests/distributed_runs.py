"""Distributed runs for tests/test_distributed.py, launched as a script so that Lightning's own launcher starts
rank 1 (``strategy="ddp"`` re-runs this file with LOCAL_RANK=1; ModelParallelStrategy likewise).

Usage: python tests/distributed_runs.py SCENARIO OUTDIR
Each rank writes OUTDIR/rank<r>.pt with what the test compares; rank 0's TensorBoard logs go to OUTDIR/tb.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).parent))
from helpers import MLP, PlantNaN, ShardedMLP, fit, health_warnings, rank_loader  # noqa: E402

from gradmon import GradCheck, GradHealthMonitor, GradNormMonitor, HealthRules, WeightInit  # noqa: E402
from gradmon.callbacks import _ranks  # noqa: E402
from gradmon.errors import GradientHealthError  # noqa: E402

PER_DEVICE_BATCH = 16
STEPS = 4


class FusedMLP(MLP):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01, fused=True)


class InitialWeights(pl.Callback):
    """The full weights as the first training step sees them."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.weights = {k: _full(v).detach().clone() for k, v in pl_module.state_dict().items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(scenario: str, out: Path) -> None:
    torch.manual_seed(0)
    callbacks: list[pl.Callback] = []
    model: MLP
    if scenario in ("ddp_norms", "fsdp_norms"):
        strategy = DDPStrategy() if scenario == "ddp_norms" else ModelParallelStrategy(data_parallel_size=2,
                                                                                       tensor_parallel_size=1)
        model = MLP() if scenario == "ddp_norms" else ShardedMLP()
        callbacks = [GradNormMonitor(log_every_n_steps=1), GradHealthMonitor(on_nonfinite="skip")]
        if scenario == "fsdp_norms":
            callbacks.append(PlantNaN(2, element=(0, 0), rank=1))
    elif scenario == "fsdp_init":
        # WeightInit on DTensor shards: the full weights must be those a single process draws with the same seeds.
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        model = ShardedMLP()
        callbacks = [WeightInit("kaiming_normal", nonlinearity="relu", seed=0),
                     WeightInit("orthogonal", include=r"^net\.2$", seed=1), InitialWeights()]
    elif scenario == "ddp_disagree":
        # Only rank 1 sees an "explosion" (a threshold no gradient passes): without a cross-rank decision rank 1
        # would stop alone and rank 0 would wait forever in its next collective.
        strategy = DDPStrategy()
        model = MLP()
        rank = int(os.environ.get("LOCAL_RANK", 0))
        threshold = 1e-30 if rank == 1 else 1e4
        rules = HealthRules(exploding_threshold=threshold, vanishing_threshold=0.0)
        callbacks = [GradHealthMonitor(rules, on_exploding="stop")]
    elif scenario == "ddp_sync_free":
        # A NaN on rank 1 only, after DDP's all-reduce: the device skip flag, combined across ranks with one
        # collective, must make both ranks skip that step, so the replicas stay identical.
        strategy = DDPStrategy()
        model = FusedMLP()
        callbacks = [GradHealthMonitor(on_nonfinite="skip", sync_free=True), PlantNaN(2, element=(0, 0), rank=1)]
    elif scenario.startswith("ddp_local_"):
        # A NaN on rank 1 only, after DDP's all-reduce, under action "warn", "stop" or "raise" (default mode, or
        # sync-free with a suffix): every rank must learn of it, rank 0 must warn and log it naming rank 1, and
        # every rank must act together.
        strategy = DDPStrategy()
        model = MLP()
        action = scenario.split("_")[2]
        callbacks = [GradHealthMonitor(on_nonfinite=action, sync_free=scenario.endswith("sync_free")),
                     PlantNaN(2, element=(0, 0), rank=1)]
    elif scenario in ("ddp_one_rank", "ddp_mismatch"):
        # A GradHealthMonitor on rank 1 only (or a GradCheck on rank 0 besides it): a clear error at setup, not a
        # hang in the first collective the other rank never joins.
        _ranks.SETUP_CHECK_TIMEOUT_S = 5.0
        strategy = DDPStrategy()
        model = MLP()
        rank = int(os.environ.get("LOCAL_RANK", 0))
        callbacks = [GradHealthMonitor()] if rank == 1 or scenario == "ddp_mismatch" else []
        if scenario == "ddp_mismatch" and rank == 0:
            callbacks.append(GradCheck())
        loader = rank_loader(rank, PER_DEVICE_BATCH, STEPS)
        try:
            fit(model, callbacks, steps=STEPS, tmp_path=out, loader=loader, devices=2, strategy=strategy,
                use_distributed_sampler=False)
            error = None
        except Exception as e:  # noqa: BLE001 - what each rank saw is the result
            error = f"{type(e).__name__}: {e}"
        torch.save({"error": error}, out / f"rank{rank}.pt")
        return
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    loader = rank_loader(int(os.environ.get("LOCAL_RANK", 0)), PER_DEVICE_BATCH, STEPS)
    error = None
    with health_warnings() as warned:
        try:
            trainer = fit(model, callbacks, steps=STEPS, tmp_path=out, loader=loader, devices=2, strategy=strategy,
                          use_distributed_sampler=False)
        except GradientHealthError as e:
            error, trainer = str(e), model.trainer
    health = next((c for c in callbacks if isinstance(c, GradHealthMonitor)), None)
    weights = {k: _full(v).detach().clone() for k, v in model.state_dict().items()}
    initial = next((c.weights for c in callbacks if isinstance(c, InitialWeights)), None)
    torch.save(
        {
            "global_step": trainer.global_step,
            "skipped_steps": health.skipped_steps if health else 0,
            "events": [(e.step, e.layer, e.condition) for e in health.events] if health else [],
            "weights": weights,
            "initial_weights": initial,
            "warnings": warned,
            "error": error,
            "ranks": [e.rank for e in health.events] if health else [],
        },
        out / f"rank{trainer.global_rank}.pt",
    )
    # Tear the process group down before the interpreter exits: left to exit, its gloo threads were once destroyed
    # while still joinable, and a loaded machine saw the process abort after its results were written.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
