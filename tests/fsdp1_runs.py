"""FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``) runs for tests/test_fsdp1.py: two CPU processes on
gloo, each started by the test with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (one launch
does every check, since each 2-process start costs seconds of imports).

Usage: python tests/fsdp1_runs.py OUTDIR

Phase 1 writes OUTDIR/raw_rank<r>.pt: per configuration, what ``ParamLayout`` + ``compute_norms`` give on this
rank's pieces (or the ValueError a refused configuration raises). Phase 2 runs Lightning's FSDPStrategy (a
subclass, to get past its GPU check) with GradNormMonitor and writes OUTDIR/lightning_rank<r>.pt; rank 0's
TensorBoard logs go to OUTDIR/tb. Phase 1's file is written before phase 2 starts, so its checks stand on their own.
"""

from __future__ import annotations

import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from gradmon.norms import ParamLayout, compute_norms  # noqa: E402
from gradmon.sharding import full_grads_and_weights, local_grad_or_zeros  # noqa: E402

NORM_TYPES = (1.0, 2.0, math.inf)
GLOBAL_BATCH = 16
# Lightning phase: per-device batch and optimizer steps.
PER_DEVICE_BATCH = 8
STEPS = 3


class Net(nn.Module):
    """Layers ``net.0`` (45 elements: odd, so FSDP1's flat shards split it unevenly), ``net.2`` (frozen),
    ``net.4``, and ``scale``, a one-element parameter on the root that one rank holds no element of."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
        self.net[2].requires_grad_(False)
        self.scale = nn.Parameter(torch.full((1,), 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def wrap(model: Net, strategy: ShardingStrategy, nested: bool, **kwargs: Any) -> FSDP:
    kwargs = {"use_orig_params": True, "device_id": torch.device("cpu"), "sharding_strategy": strategy, **kwargs}
    if nested:
        for i, layer in enumerate(model.net):
            if isinstance(layer, nn.Linear):
                model.net[i] = FSDP(layer, **kwargs)
    return FSDP(model, **kwargs)


def describe(model: nn.Module) -> list[tuple[str, tuple[int, ...], bool, tuple[int, ...] | None]]:
    """(name, local shape, requires_grad, grad shape or None) per parameter, as FSDP1 leaves them after backward."""
    return [(n, tuple(p.shape), p.requires_grad, None if p.grad is None else tuple(p.grad.shape))
            for n, p in model.named_parameters()]


def measure(model: FSDP, inner: Net) -> dict[str, Any]:
    """Norms from this rank's pieces, the layout every rank must agree on, and the gathered full gradients."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layout = ParamLayout.from_named_parameters(trainable, module=model)
    grads = [local_grad_or_zeros(p) for p in layout.params]
    out: dict[str, Any] = {
        "layer_names": layout.layer_names,
        "param_names": layout.param_names,
        "shard_weights": layout.shard_weights.tolist(),
        "grad_norms": {p: compute_norms(layout, grads, p).per_layer() for p in NORM_TYPES},
        "describe": describe(model),
    }
    everything = ParamLayout.from_named_parameters(model.named_parameters(), module=model)
    out["weight_norms"] = compute_norms(everything, [p.detach() for p in everything.params], 2.0).per_layer()
    full_grads, full_weights = full_grads_and_weights(layout)
    out["full_grads"] = dict(zip(layout.param_names, full_grads))
    out["full_weights"] = dict(zip(layout.param_names, full_weights))
    # The pieces are sharded again after the gather: norms taken now still match.
    out["grad_norms_after_gather"] = compute_norms(
        layout, [local_grad_or_zeros(p) for p in layout.params], 2.0).per_layer()
    return out


def refused(build: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """The ValueError a layout construction raises (identically on every rank, so no collective is left open)."""
    try:
        build(*args, **kwargs)
    except ValueError as e:
        return str(e)
    return "no error"


def raw_phase(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    x, y = global_batch()
    mine = (x[rank::world], y[rank::world])
    results: dict[str, Any] = {}
    configs = {
        "full_shard": (ShardingStrategy.FULL_SHARD, True, {}),
        "shard_grad_op": (ShardingStrategy.SHARD_GRAD_OP, True, {}),
        "no_shard": (ShardingStrategy.NO_SHARD, True, {}),
        "root_only": (ShardingStrategy.FULL_SHARD, False, {}),
        # A 1 x 2 mesh: one replica of two shards (4 ranks would be needed for both at once).
        "hybrid_1x2": (ShardingStrategy.HYBRID_SHARD, True,
                       {"device_mesh": init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))}),
    }
    for name, (strategy, nested, kwargs) in configs.items():
        torch.manual_seed(0)
        inner = Net()
        model = wrap(inner, strategy, nested, **kwargs)
        loss_of(model, *mine).backward()
        results[name] = measure(model, inner)
        if name == "full_shard":
            named = list(model.named_parameters())
            results["refuse_no_module"] = refused(ParamLayout.from_named_parameters, named)
            # The inner module: its nested FSDP1 instances own net.*, but scale belongs to the root wrapper.
            results["refuse_inner_module"] = refused(ParamLayout.from_named_parameters, named, module=model.module)
            names = [n for n, _ in named]
            results["refuse_direct"] = refused(ParamLayout, [p for _, p in named], names, names)

    torch.manual_seed(0)
    model = wrap(Net(), ShardingStrategy.FULL_SHARD, True, use_orig_params=False)
    results["describe_orig_false"] = describe(model)
    results["refuse_orig_false"] = refused(ParamLayout.from_named_parameters, model.named_parameters(), module=model)

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    model = wrap(Net(), ShardingStrategy.HYBRID_SHARD, True, device_mesh=mesh)
    results["refuse_hybrid_one_rank_shards"] = refused(
        ParamLayout.from_named_parameters, model.named_parameters(), module=model)

    groups = [dist.new_group([r]) for r in range(world)]
    torch.manual_seed(0)
    model = wrap(Net(), ShardingStrategy.FULL_SHARD, True, process_group=groups[rank])
    results["refuse_subgroup"] = refused(ParamLayout.from_named_parameters, model.named_parameters(), module=model)
    return results


def lightning_phase(rank: int, out: Path) -> dict[str, Any]:
    """GradNormMonitor under Lightning's FSDPStrategy, the layers wrapped by hand in ``configure_model``."""
    from helpers import MLP, fit, rank_loader
    from lightning.pytorch.strategies import FSDPStrategy

    from gradmon import GradNormMonitor

    class CPUFSDPStrategy(FSDPStrategy):
        """Lightning refuses ``type(strategy) is FSDPStrategy`` without a GPU; a subclass is let through, and FSDP1
        itself runs on CPU with gloo."""

    class FSDP1MLP(MLP):
        """helpers.MLP with 8->5->5->10 (net.0 has 45 elements) and net.2 frozen, wrapped per Linear and whole."""

        def __init__(self) -> None:
            super().__init__(depth=2, width=5)
            self.net[2].requires_grad_(False)

        def configure_model(self) -> None:
            if isinstance(self.net, FSDP):
                return
            kwargs = {"use_orig_params": True, "device_id": torch.device("cpu")}
            for i, layer in enumerate(self.net):
                if isinstance(layer, nn.Linear):
                    self.net[i] = FSDP(layer, **kwargs)
            self.net = FSDP(self.net, **kwargs)

    torch.manual_seed(0)
    trainer = fit(FSDP1MLP(), [GradNormMonitor(log_every_n_steps=1)], steps=STEPS, tmp_path=out,
                  loader=rank_loader(rank, PER_DEVICE_BATCH, STEPS), devices=2,
                  strategy=CPUFSDPStrategy(process_group_backend="gloo"), use_distributed_sampler=False)
    return {"global_step": trainer.global_step, "strategy_model": type(trainer.strategy.model).__name__}


def main(out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save(raw_phase(rank, world), out / f"raw_rank{rank}.pt")
    try:
        result = lightning_phase(rank, out)
    except Exception:  # reported by the test that reads it; the raw results above stand regardless
        result = {"error": traceback.format_exc()}
    torch.save(result, out / f"lightning_rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
