"""Overhead benchmark: what gradmon's monitors cost per training step, against no monitoring and against Lightning's
documented ``grad_norm`` recipe.

    python -m experiments.benchmark [--repeats 7]

Trains, in one process, interleaved and repeated (median of the repeats), a 20x64 and a 4x512 ReLU MLP (kaiming
init, so the healthy path is timed; batch 128, CPU) four ways:

  (a) ``none``: no callbacks;
  (b) ``gradmon``: GradNormMonitor + GradHealthMonitor, computing every step and logging every 50;
  (c) ``recipe``: ``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``, logging every 50;
  (f) ``floor``, a reference: one callback that does nothing but ``torch._foreach_norm`` over the gradients in
      ``on_before_optimizer_step``: roughly what reading the gradients once at that hook costs.

All four log to TensorBoard with ``log_every_n_steps=50``. Step times are taken between callback hooks after a
warm-up, so Trainer start-up is excluded. Prints ms/step and the ratios (b)/(a), (c)/(b) and (f)/(a), then the cost
of one GradCheck relative to one training step.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import grad_norm
from torch import nn

from experiments import benchmark_gradcheck
from experiments.benchmark_gradcheck import IN_FEATURES, NUM_CLASSES
from experiments.models import kaiming_mlp
from gradmon import GradHealthMonitor, GradNormMonitor

WARMUP_STEPS = 20
BATCH = 128
#: The variants, in the order of the printed table's columns (a), (b), (c) and (f).
VARIANTS = ("none", "gradmon", "recipe", "floor")


class BenchMLP(pl.LightningModule):
    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.net = kaiming_mlp(IN_FEATURES, NUM_CLASSES, depth, width)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class RecipeMLP(BenchMLP):
    """Lightning's documented per-layer gradient-norm recipe."""

    def on_before_optimizer_step(self, optimizer):
        self.log_dict(grad_norm(self, norm_type=2))


class NormFloor(pl.Callback):
    """Reads every gradient once per step and nothing else: what gradmon cannot go below at its hook."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        torch._foreach_norm([p.grad for p in pl_module.parameters()], 2.0)


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP_STEPS:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def ms_per_step(variant: str, depth: int, width: int, steps: int, logdir: str) -> float:
    torch.manual_seed(0)
    model = (RecipeMLP if variant == "recipe" else BenchMLP)(depth, width)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if variant == "gradmon":
        callbacks = [GradNormMonitor(log_every_n_steps=50), GradHealthMonitor(), timer]
    elif variant == "floor":
        callbacks = [NormFloor(), timer]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * steps, IN_FEATURES, generator=g)
    y = torch.randint(0, NUM_CLASSES, (BATCH * steps,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks, log_every_n_steps=50,
        logger=pl.loggers.TensorBoardLogger(logdir, name=variant), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(model, loader)
    return 1e3 * (timer.end - timer.start) / (steps - WARMUP_STEPS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="runs of each variant (median taken); at least 5")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    models = {"20x64": (20, 64, 400), "4x512": (4, 512, 150)}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, lightning {pl.__version__}")
    print(f"{'model':<8}{'(a) none':>12}{'(b) gradmon':>14}{'(c) recipe':>13}{'(f) floor':>12}"
          f"{'(b)/(a)':>10}{'(c)/(b)':>10}{'(f)/(a)':>10}")
    with tempfile.TemporaryDirectory() as logdir:
        for name, (depth, width, steps) in models.items():
            times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
            for _ in range(max(args.repeats, 5)):
                for variant in times:  # interleaved, so drifts in machine load hit all four alike
                    times[variant].append(ms_per_step(variant, depth, width, steps, logdir))
            none, gradmon, recipe, floor = (statistics.median(times[v]) for v in VARIANTS)
            times_ms = f"{none:>10.3f}ms{gradmon:>12.3f}ms{recipe:>11.3f}ms{floor:>10.3f}ms"
            ratios = f"{gradmon / none:>10.3f}{recipe / gradmon:>10.2f}{floor / none:>10.3f}"
            print(f"{name:<8}{times_ms}{ratios}", flush=True)
    print()
    benchmark_gradcheck.main(threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
