"""Experiment 1: the sigmoid saturates, and its gradient vanishes with it.

The gradient ``sigmoid(x) * (1 - sigmoid(x))`` peaks at 0.25 at ``x = 0`` and falls to about 3.35e-4 at ``|x| = 8``:
every sigmoid layer a gradient passes through scales it by at most a quarter. Writes the curve and its gradient as a
PNG and as a TensorBoard image::

    python -m experiments.sigmoid --out runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

EXPERIMENT = "sigmoid"


def sigmoid_and_gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sigmoid(x)`` and its derivative, the derivative taken by autograd as the tutorial does."""
    x = x.detach().clone().requires_grad_(True)
    y = torch.sigmoid(x)
    y.backward(torch.ones_like(x))
    return y.detach(), x.grad


def plot(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> Figure:
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    linear, log = fig.subplots(1, 2)
    linear.plot(x, y, "--", label="sigmoid(x)")
    linear.plot(x, grad, "r-", label="d sigmoid / dx")
    linear.set(title="sigmoid and its gradient", xlabel="x", ylabel="value")
    linear.legend(loc="best")
    log.semilogy(x, grad, "r-")
    log.set(title="the gradient on a log scale", xlabel="x", ylabel="d sigmoid / dx")
    log.annotate(f"max {grad.max():.2f}", (0, grad.max()), textcoords="offset points", xytext=(8, -12))
    log.annotate(f"{grad[-1]:.2e}", (x[-1], grad[-1]), textcoords="offset points", xytext=(-48, 4))
    for ax in (linear, log):
        ax.grid(True, which="major")
    return fig


def run(out: Path) -> Path:
    """Write ``out/sigmoid/sigmoid.png`` and the TensorBoard run ``out/sigmoid/saturation``; returns the PNG."""
    x = torch.linspace(-8.0, 8.0, 161)
    y, grad = sigmoid_and_gradient(x)
    fig = plot(x, y, grad)
    png = Path(out) / EXPERIMENT / "sigmoid.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    with SummaryWriter(str(Path(out) / EXPERIMENT / "saturation")) as writer:
        writer.add_figure("sigmoid/curve_and_gradient", fig, close=False)
    return png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.sigmoid", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs"), help="log and figure root (default: runs)")
    print(run(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
