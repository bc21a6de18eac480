"""Where gradmon's per-step time goes: the time inside GradNormMonitor + GradHealthMonitor's hooks on the 20x64 MLP
(batch 128, logging every 50, health checked every step, 1 torch thread), split into the norm kernel, the host
transfer, the health rules and the rest (bookkeeping: layouts, the missing-gradient scan, combining parameters into
layers, dispatch)::

    python -m experiments.profile_hooks [--steps 400]

Each part is timed with perf_counter around the calls that make it up, so the parts add up to the in-hook total.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from collections import defaultdict

import lightning.pytorch as pl
import torch

import gradmon.health
import gradmon.norms
from experiments.timing import BATCH, IN_FEATURES, NUM_CLASSES, WARMUP_STEPS, BenchMLP, HookClock
from gradmon import GradHealthMonitor, GradNormMonitor


def profile(steps: int = 400, depth: int = 20, width: int = 64) -> dict[str, float]:
    """Microseconds per step: in-hook total and its parts."""
    parts: dict[str, float] = defaultdict(float)
    counting = [False]

    def timed(name: str, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if counting[0]:
                    parts[name] += time.perf_counter() - start

        return wrapper

    originals = {
        (torch, "_foreach_norm"): "kernel",
        (gradmon.norms, "read_host"): "transfer",
        (gradmon.health.HealthTracker, "update"): "rules",
    }
    saved = {key: getattr(*key) for key in originals}
    for (owner, attr), name in originals.items():
        setattr(owner, attr, timed(name, saved[(owner, attr)]))

    class Counting(pl.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            counting[0] = trainer.global_step >= WARMUP_STEPS

    try:
        torch.manual_seed(0)
        clock = HookClock()
        callbacks = [Counting(), clock.wrap(GradNormMonitor(log_every_n_steps=50)), clock.wrap(GradHealthMonitor())]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH * steps, IN_FEATURES, generator=g)
        y = torch.randint(0, NUM_CLASSES, (BATCH * steps,), generator=g)
        with tempfile.TemporaryDirectory() as logdir:
            pl.Trainer(accelerator="cpu", max_steps=steps, callbacks=callbacks, log_every_n_steps=50,
                       logger=pl.loggers.TensorBoardLogger(logdir), enable_progress_bar=False,
                       enable_model_summary=False, enable_checkpointing=False).fit(
                BenchMLP(depth, width), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), BATCH))
    finally:
        for key, function in saved.items():
            setattr(*key, function)
    measured = steps - WARMUP_STEPS
    result = {name: 1e6 * parts[name] / measured for name in ("kernel", "transfer", "rules")}
    result["total"] = 1e6 * clock.seconds / measured
    result["bookkeeping"] = result["total"] - sum(result.get(k, 0.0) for k in ("kernel", "transfer", "rules"))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    result = profile(args.steps)
    print("| part | us per step |\n|---|---|")
    for name in ("kernel", "transfer", "rules", "bookkeeping", "total"):
        print(f"| {name} | {result.get(name, 0.0):.0f} |")


if __name__ == "__main__":
    main()
