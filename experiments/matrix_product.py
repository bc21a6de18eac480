"""Experiment 2: a product of many random matrices explodes unless each factor preserves the norm.

The tutorial multiplies 50 standard-normal 4x4 matrices and gets entries near 1e12: each factor stretches a vector
by about ``sqrt(n) = 2`` on average. Scaling the entries to variance ``1 / n`` keeps the mean squared norm constant,
but at width 4 the typical (median) norm still drifts down by about 0.06 decades per factor, because the average of
``log |Mx|`` is below ``log`` of its root-mean-square; orthogonal factors keep it exactly. This is the forward pass of a
deep linear network, and its backward pass is the same product transposed. Medians over many draws are logged::

    python -m experiments.matrix_product --out runs
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from gradmon.tensorboard import write_scalars

EXPERIMENT = "matrix_product"


def _standard_normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def _scaled(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return _standard_normal(shape, generator) / math.sqrt(shape[-1])


def _orthogonal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(_standard_normal(shape, generator))
    # The sign fix makes q uniformly (Haar) distributed, not just orthogonal.
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


#: How each factor is drawn, by variant name.
FACTORS: dict[str, Callable[[tuple[int, ...], torch.Generator], torch.Tensor]] = {
    "standard_normal": _standard_normal,
    "scaled": _scaled,
    "orthogonal": _orthogonal,
}


def product_norms(variant: str, k_max: int = 50, n: int = 4, draws: int = 256, seed: int = 0) -> torch.Tensor:
    """Frobenius norms of ``M_1 @ ... @ M_k`` for ``k = 1 .. k_max``, one row per independent draw of the factors:
    a ``(draws, k_max)`` float64 tensor (float64 so that 1e15 is still an exact-enough number)."""
    generator = torch.Generator().manual_seed(seed)
    draw = FACTORS[variant]
    product = draw((draws, n, n), generator)
    norms = [torch.linalg.matrix_norm(product)]
    for _ in range(k_max - 1):
        product = product @ draw((draws, n, n), generator)
        norms.append(torch.linalg.matrix_norm(product))
    return torch.stack(norms, dim=1)


def plot(norms: dict[str, torch.Tensor], n: int) -> Figure:
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for variant, rows in norms.items():
        k = torch.arange(1, rows.shape[1] + 1)
        low, median, high = torch.quantile(rows, torch.tensor([0.1, 0.5, 0.9], dtype=rows.dtype), dim=0)
        ax.semilogy(k, median, label=variant)
        ax.fill_between(k, low, high, alpha=0.2)
    ax.set(
        title=f"Norm of a product of k random {n}x{n} matrices ({rows.shape[0]} draws, 10-90% band)",
        xlabel="k (number of factors)",
        ylabel="Frobenius norm of the product (median)",
    )
    ax.grid(True, which="major")
    ax.legend(loc="upper left", title="factor entries")
    return fig


def run(out: Path, k_max: int = 50, n: int = 4, draws: int = 256) -> Path:
    """One TensorBoard run per variant at ``out/matrix_product/<variant>`` with the median norm at step k, and the
    figure ``out/matrix_product/matrix_product.png``; returns the PNG."""
    norms = {variant: product_norms(variant, k_max, n, draws) for variant in FACTORS}
    for variant, rows in norms.items():
        with SummaryWriter(str(Path(out) / EXPERIMENT / variant)) as writer:
            for k, median in enumerate(rows.median(dim=0).values.tolist(), start=1):
                values = {"matrix_product/norm": median, "matrix_product/log10_norm": math.log10(median)}
                write_scalars(writer, values, k)
    png = Path(out) / EXPERIMENT / "matrix_product.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(norms, n).savefig(png, dpi=100)
    return png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.matrix_product", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs"), help="log and figure root (default: runs)")
    parser.add_argument("--k-max", type=int, default=50, help="most factors in the product (default: 50)")
    parser.add_argument("--n", type=int, default=4, help="matrix size (default: 4)")
    parser.add_argument("--draws", type=int, default=256, help="independent products per variant (default: 256)")
    args = parser.parse_args(argv)
    print(run(args.out, args.k_max, args.n, args.draws))


if __name__ == "__main__":
    main()
