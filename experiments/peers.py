"""gradmon side by side with what a user would pick instead, on the same model, in one process::

    python -m experiments.peers                     # CPU: scaled-down GPT and ResNet shapes, and the 20x64 MLP
    python -m experiments.peers --device cuda       # GPT-2 small (bf16-mixed), ResNet-50 (channels-last, bf16)
    python -m experiments.peers --models gpt --repeats 5 --steps 80

Every variant trains the same model on the same fixed batch, with a TensorBoardLogger writing every 50 steps; the
runs are interleaved (variant after variant, repeat after repeat) so that the machine's drift touches all alike. Each
run's mean step after the warm-up is taken (logging steps included: their cost is part of the price), and the table
gives the median over the repeats, its spread (lowest to highest), the ratio to training with nothing, and what each
variant tells you. The variants:

- ``none``: no monitoring.
- ``gradmon``: GradNormMonitor logging every 50 steps, GradHealthMonitor judging every step, ActivationMonitor every
  50 steps (per-layer norms, health flags and actions, activations, a diagnosis).
- ``gradmon sync-free``: the same with ``GradHealthMonitor(sync_free=True)``.
- ``lightning recipe``: Lightning's documented ``self.log_dict(grad_norm(self, norm_type=2))`` in
  ``on_before_optimizer_step``: per-layer norms, one host sync per value, every step.
- ``wandb.watch``: ``WandbLogger(offline=True).watch(model, log="gradients", log_freq=50)``: backward hooks on every
  parameter, a gradient histogram of each every 50 steps (needs ``pip install -e '.[peers]'``; skipped without).
- ``composer style``: what Composer's OptimizerMonitor does: each parameter's gradient norm, read with ``.item()``,
  every step.
- ``fastai style``: what fastai's ActivationStats does: forward hooks on every module, each output's mean and std
  read every step.
- ``total norm``: what torchtitan and Megatron log: the total gradient norm only, taken every step, read every 50.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch.utils.data import DataLoader

from experiments import lightning_quiet
from experiments.peer_models import build, parameters_millions
from experiments.timing import StepTimer
from gradmon import ActivationMonitor, GradHealthMonitor, GradNormMonitor

WARMUP = 10
LOG_EVERY = 50


class LightningRecipe(pl.Callback):
    """Lightning's documented recipe: ``self.log_dict(grad_norm(self, norm_type=2))`` before each optimizer step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


class PerParameterItem(pl.Callback):
    """Composer's OptimizerMonitor, in short: each parameter's gradient norm, read on the host, every step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.norms = {n: p.grad.norm().item() for n, p in pl_module.named_parameters() if p.grad is not None}


class ForwardHookStats(pl.Callback):
    """fastai's ActivationStats, in short: forward hooks on every module, each output's mean and std read every step."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.stats: dict[str, tuple[float, float]] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in pl_module.named_modules() if n]

    def _hook(self, name: str) -> Callable:
        def hook(module, args, output) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                out = output.detach().float()
                self.stats[name] = (out.mean().item(), out.std().item())
        return hook

    def on_fit_end(self, trainer, pl_module) -> None:
        for handle in self.handles:
            handle.remove()


class TotalNorm(pl.Callback):
    """torchtitan's and Megatron's log: the total gradient norm, taken every step, read when logging."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        if trainer.global_step % LOG_EVERY == 0:
            self.value = total.item()


class WandbWatch(pl.Callback):
    """``wandb.watch(model, log="gradients", log_freq=50)`` through Lightning's WandbLogger, offline."""

    def on_fit_start(self, trainer, pl_module) -> None:
        for logger in trainer.loggers:
            if hasattr(logger, "watch"):
                logger.watch(pl_module, log="gradients", log_freq=LOG_EVERY)


@dataclass(frozen=True)
class Variant:
    name: str
    callbacks: Callable[[], list[pl.Callback]]
    reports: str
    wandb: bool = False


VARIANTS = [
    Variant("none", list, "-"),
    Variant("gradmon", lambda: [GradNormMonitor(log_every_n_steps=LOG_EVERY), GradHealthMonitor(),
                                ActivationMonitor(log_every_n_steps=LOG_EVERY)],
            "per-layer norms, update ratios; health flags and actions every step; activations; a cause"),
    Variant("gradmon sync-free", lambda: [GradNormMonitor(log_every_n_steps=LOG_EVERY),
                                          GradHealthMonitor(sync_free=True),
                                          ActivationMonitor(log_every_n_steps=LOG_EVERY)], "the same"),
    Variant("lightning recipe", lambda: [LightningRecipe()], "per-layer norms"),
    Variant("wandb.watch", lambda: [WandbWatch()], "per-parameter gradient histograms", wandb=True),
    Variant("composer style", lambda: [PerParameterItem()], "per-parameter norms"),
    Variant("fastai style", lambda: [ForwardHookStats()], "activation mean and std"),
    Variant("total norm", lambda: [TotalNorm()], "total norm only"),
]


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def run(variant: Variant, model: str, device: str, steps: int, logdir: str) -> float:
    """One training run of ``model`` under ``variant``; its mean step in milliseconds after the warm-up."""
    module = build(model, device)
    clock = StepTimer(warmup=WARMUP)
    if variant.wandb:
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        logger = WandbLogger(offline=True, save_dir=logdir, project="gradmon-peers")
    else:
        logger = TensorBoardLogger(logdir, name=model, version=variant.name.replace(" ", "_"))
    precision = "bf16-mixed" if device == "cuda" and model != "mlp" else "32-true"
    trainer = pl.Trainer(
        accelerator=device, devices=1, max_steps=steps, logger=logger, log_every_n_steps=LOG_EVERY,
        precision=precision, callbacks=[*variant.callbacks(), clock], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(range(steps), batch_size=1))
    if variant.wandb:
        import wandb

        wandb.finish()
    return 1e3 * (clock.end - clock.start) / (steps - WARMUP)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description="gradmon side by side with its peers, on one model at a time.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="gpt,resnet,mlp", help="comma-separated: gpt, resnet, mlp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help=f"steps per run, the first {WARMUP} untimed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in VARIANTS if not v.wandb or wandb_available()]
    lines = [f"device: {_device(args.device)}; torch {torch.__version__}, Lightning {pl.__version__}; "
             f"{args.repeats} repeats of {args.steps} steps ({WARMUP} untimed), interleaved"]
    if len(variants) < len(VARIANTS):
        lines.append("wandb.watch: skipped (wandb is not installed: pip install -e '.[peers]')")
    with lightning_quiet(), tempfile.TemporaryDirectory() as logdir:  # without the runs' start-up notes
        for model in args.models.split(","):
            times: dict[str, list[float]] = {v.name: [] for v in variants}
            for _ in range(args.repeats):
                for variant in variants:
                    times[variant.name].append(run(variant, model, args.device, args.steps, logdir))
            lines += ["", _title(model, args.device), *table(variants, times)]
    for line in lines:
        print(line)
    return lines


def table(variants: list[Variant], times: dict[str, list[float]]) -> list[str]:
    """The Markdown table of one model: median step, spread, ratio to no monitoring, what each variant reports."""
    base = statistics.median(times["none"])
    rows = ["| variant | median step | spread | / none | reports |", "|---|---|---|---|---|"]
    for v in variants:
        median = statistics.median(times[v.name])
        spread = f"{min(times[v.name]):.1f} to {max(times[v.name]):.1f} ms"
        rows.append(f"| {v.name} | {median:.1f} ms | {spread} | {median / base:.3f} | {v.reports} |")
    return rows


def _title(model: str, device: str) -> str:
    module = build(model, device)
    return f"{model} ({parameters_millions(module):.2f}M parameters):"


def _device(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


if __name__ == "__main__":
    main()
