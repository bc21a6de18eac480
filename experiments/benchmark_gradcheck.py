"""What one gradient check costs, in training steps.

For two reference ReLU MLPs (kaiming init, batch 128, CPU) it times one training step (forward, backward, SGD step,
in float32) and one :func:`gradmon.numerical.check_gradients` on the first ``num_samples`` examples of the batch and
on the whole batch, and reports the medians and their ratio. Run with ``python -m experiments.benchmark_gradcheck``.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from experiments.models import kaiming_mlp
from gradmon.numerical import check_gradients, layer_parameters
from gradmon.tensorboard import markdown_table

IN_FEATURES = 64
NUM_CLASSES = 10

#: name -> (hidden layers, width)
REFERENCE_MLPS = {"deep narrow": (20, 64), "shallow wide": (4, 512)}


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls, after one untimed call (allocator and thread-pool warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    model_factory: Callable[[], nn.Module],
    *,
    batch_size: int = 128,
    num_samples: int = 8,
    num_directions: int = 2,
    repeats: int = 7,
    seed: int = 0,
) -> dict[str, float]:
    """Median seconds of one training step and of one check on ``num_samples`` and on all ``batch_size`` examples,
    the check-to-step ratios, and the model's parameter and layer counts."""
    torch.manual_seed(seed)
    model = model_factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = torch.randn(batch_size, IN_FEATURES), torch.randint(0, NUM_CLASSES, (batch_size,))
    sample = batch[0][:num_samples], batch[1][:num_samples]

    def train_step() -> None:
        optimizer.zero_grad()
        cross_entropy(model, batch).backward()
        optimizer.step()

    def check(inputs: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], object]:
        return lambda: check_gradients(model, cross_entropy, inputs, num_directions=num_directions)

    step = median_seconds(train_step, repeats)
    check_sample = median_seconds(check(sample), repeats)
    check_full = median_seconds(check(batch), repeats)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "layers": len(layer_parameters(model)),
        "step_s": step,
        "check_s": check_sample,
        "check_full_s": check_full,
        "ratio": check_sample / step,
        "ratio_full": check_full / step,
    }


def main(threads: int = 1) -> None:
    # One thread: on a shared or busy machine, competing OpenMP thread pools swamp the millisecond-scale step.
    torch.set_num_threads(threads)
    num_samples, batch_size = 8, 128
    rows = []
    for name, (depth, width) in REFERENCE_MLPS.items():
        model = functools.partial(kaiming_mlp, IN_FEATURES, NUM_CLASSES, depth, width)
        m = measure(model, batch_size=batch_size, num_samples=num_samples)
        rows.append([
            f"{name} ({depth}x{width})",
            f"{m['params']:,}",
            m["layers"],
            f"{m['step_s'] * 1e3:.2f}",
            f"{m['check_s'] * 1e3:.1f}",
            f"{m['ratio']:.1f}",
            f"{m['check_full_s'] * 1e3:.1f}",
            f"{m['ratio_full']:.1f}",
        ])
    header = [
        "MLP (hidden x width)",
        "params",
        "layers",
        f"step ms (batch {batch_size})",
        f"check ms ({num_samples} samples)",
        "check / step",
        f"check ms ({batch_size} samples)",
        "check / step",
    ]
    print(f"One gradient check (2 directions per layer, float64) vs one float32 training step, CPU, "
          f"{torch.get_num_threads()} threads, median of 7:\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
