"""How a tensor is split across ranks, and how to read it whole: DTensors (FSDP2, ``fully_shard``) and FSDP1's flat
pieces (``FullyShardedDataParallel(use_orig_params=True)``). :mod:`gradmon.norms` weights each rank's partial sums by
what is here, so one collective gives the norms of the whole tensors.

Also the compatibility shim for torch builds without distributed support. This module never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from gradmon.layout import ParamLayout

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch build without distributed support
    dist = None  # type: ignore[assignment]
    DTensor = ()  # type: ignore[assignment,misc]


def shard_weights(
    params: Sequence[Tensor], names: Sequence[str], module: nn.Module | None, fsdp1: bool
) -> Tensor | None:
    """Per parameter, 1 / (how many ranks hold the same piece): the weight of each rank's p-th-power sum in the
    world-wide sum. ``None`` when nothing is sharded (no DTensor, no FSDP1 piece): every rank holds whole tensors and
    no collective is needed."""
    if not (fsdp1 or any(isinstance(p, DTensor) for p in params)):
        return None
    world = dist.get_world_size()
    holders = _fsdp1_holders(params, names, module) if fsdp1 else {}
    return torch.tensor([_shard_fraction(p, world, holders) for p in params], dtype=torch.float64)


def _shard_fraction(p: Tensor, world: int, fsdp1_holders: Mapping[int, int] | None = None) -> float:
    """1 / (how many ranks hold the same piece of ``p``): the weight that makes a world-wide sum count it once.

    ``fsdp1_holders`` maps ``id`` of each FSDP1 piece to that count (:func:`_fsdp1_holders`); any other plain tensor
    is whole on every rank.
    """
    if fsdp1_holders and id(p) in fsdp1_holders:
        return 1.0 / fsdp1_holders[id(p)]
    if not isinstance(p, DTensor):
        return 1.0 / world
    shards = 1
    for size, placement in zip(p.device_mesh.shape, p.placements):
        if isinstance(placement, Shard):
            shards *= size
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"gradmon cannot take norms of a DTensor with placement {placement}: only Shard and Replicate."
            )
    return shards / world


def is_fsdp1_piece(p: Tensor) -> bool:
    """Whether FSDP1 flattened ``p``: it marks the original parameters it takes over (``use_orig_params=True``) and
    its own ``FlatParameter`` s with ``_fsdp_flattened``, so no module walk is needed to notice FSDP1. FSDP2 does not
    mark its DTensors."""
    return bool(getattr(p, "_fsdp_flattened", False)) and not isinstance(p, DTensor)


_FIX_ORIG_PARAMS = (
    "Wrap with FullyShardedDataParallel(..., use_orig_params=True) (Lightning's FSDPStrategy sets it by default)."
)


def _fsdp1_holders(params: Sequence[Tensor], names: Sequence[str], module: nn.Module | None) -> dict[int, int]:
    """For each FSDP1 piece among ``params`` (by ``id``): how many ranks hold that same piece.

    Taken from the FSDP1 instances inside ``module`` that own the pieces: their sharding strategy and process
    groups. Every rank derives the same numbers from the same configuration, so every rank weights alike without
    a collective. Anything gradmon cannot weight for certain raises ``ValueError`` naming what to change.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    flat = [n for n, p in zip(names, params) if getattr(p, "_is_flat_param", False)]
    if flat:
        raise ValueError(
            f"gradmon cannot take per-layer norms of FSDP1 with use_orig_params=False: the parameters are "
            f"FlatParameters ({flat[0]!r}), each several layers' pieces run together. {_FIX_ORIG_PARAMS}"
        )
    if module is None:
        raise ValueError(
            "These parameters are FSDP1 (FullyShardedDataParallel) pieces, and how they are sharded is only known "
            "to the FSDP1 modules: pass module=<the outermost model> (under Lightning: trainer.strategy.model) to "
            "ParamLayout.from_named_parameters."
        )
    world = dist.get_world_size()
    holders: dict[int, int] = {}
    for m in module.modules():
        if not isinstance(m, FullyShardedDataParallel):
            continue
        if not m._use_orig_params:
            raise ValueError(f"gradmon cannot take per-layer norms of FSDP1 with use_orig_params=False. "
                             f"{_FIX_ORIG_PARAMS}")
        handle = m._handle
        if handle is None:  # an FSDP1 instance without parameters of its own
            continue
        count = _fsdp1_replicas(m, world)
        flat_param = handle.flat_param
        for p in [*(flat_param._params or ()), *(flat_param._shared_params or ())]:
            holders[id(p)] = count
    for name, p in zip(names, params):
        if is_fsdp1_piece(p) and id(p) not in holders:
            raise ValueError(
                f"{name!r} is an FSDP1 piece, but no FullyShardedDataParallel inside the module given owns it: pass "
                "the outermost model as module= (under Lightning: trainer.strategy.model, the FSDP1 wrapper when "
                "the strategy wrapped the LightningModule; not the LightningModule inside it)."
            )
    return holders


def _fsdp1_replicas(fsdp: nn.Module, world: int) -> int:
    """How many ranks hold each piece of one FSDP1 instance's parameters, after checking that its ranks, sharding
    and replication together cover the whole world exactly once (else the weights cannot be known)."""
    from torch.distributed.fsdp import ShardingStrategy

    strategy = fsdp.sharding_strategy
    shard_ranks = fsdp.world_size  # the size of the group it shards over (HYBRID: within one replica)
    inter_pg = getattr(fsdp, "_inter_node_pg", None)  # only HYBRID_SHARD and _HYBRID_SHARD_ZERO2 have one
    replicas = inter_pg.size() if inter_pg is not None else 1
    hybrid = (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2)
    if strategy in hybrid:
        count = replicas
    elif replicas > 1:
        # HYBRID_SHARD over one-rank shard groups: FSDP1 clamps it to NO_SHARD on that one rank and then never
        # all-reduces across the replicas (seen with torch 2.13), so the ranks' gradients differ.
        raise ValueError(
            "gradmon cannot take norms under FSDP1 HYBRID_SHARD whose shard groups have one rank: FSDP falls back "
            "to NO_SHARD there and leaves the replicas' gradients unsynchronized. Use NO_SHARD over all ranks, or "
            "shard groups of two or more ranks."
        )
    elif strategy == ShardingStrategy.NO_SHARD:
        count = shard_ranks
    elif strategy in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP):
        count = 1
    else:
        raise ValueError(f"gradmon does not know how FSDP1's {strategy} places parameters; use FULL_SHARD, "
                         "SHARD_GRAD_OP, NO_SHARD or HYBRID_SHARD.")
    if shard_ranks * replicas != world:
        raise ValueError(
            f"gradmon cannot weight FSDP1 pieces whose process groups span {shard_ranks * replicas} of the {world} "
            f"ranks ({strategy.name}): which other ranks hold the same pieces is unknown to it. Shard (or, with "
            "HYBRID_SHARD, shard and replicate) over all ranks."
        )
    return count


def local_tensor(t: Tensor) -> Tensor:
    """This rank's piece of a DTensor; any other tensor as it is (an FSDP1 parameter already is its piece)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: Tensor) -> Tensor:
    """The whole of a DTensor (a collective: every rank must call it); any other tensor as it is.

    An FSDP1 piece (or its ``.grad``) is a flat 1-D slice that carries neither the parameter's shape nor a link to
    the rest, so it cannot be made whole here: use :func:`full_grads_and_weights` for layouts with ``fsdp1``.
    """
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_grad_or_zeros(p: Tensor) -> Tensor:
    """``p.grad``, or zeros shaped like ``p`` (this rank's piece, of ``p``'s dtype and device) when it has none.

    For sharded layouts every rank must pass a tensor for every parameter so that the one collective lines up:
    FSDP1 leaves ``grad`` None for a parameter with no elements on this rank (its piece has shape ``(0,)``), and
    a parameter unused this step has no gradient anywhere. A DTensor parameter gives a DTensor of zeros.
    """
    grad = p.grad
    if grad is not None:
        return grad
    return torch.zeros_like(p, requires_grad=False)


@contextmanager
def summoned(module: nn.Module | None, fsdp1: bool) -> Iterator[None]:
    """Inside, the FSDP1 parameters of ``module`` have their full shape and gradient (views into gathered memory that
    is freed on exit: copy what must outlive it); without ``fsdp1``, nothing happens."""
    if not fsdp1:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(module, writeback=False, with_grads=True):
        yield


@torch.no_grad()
def full_grads_and_weights(layout: ParamLayout) -> tuple[list[Tensor], list[Tensor]]:
    """Every parameter's whole gradient (zeros where it has none) and whole weight, flattened copies in layout
    order, on every rank: for histograms. A collective: every rank must call it.

    FSDP1 pieces are made whole with ``FullyShardedDataParallel.summon_full_params(layout.module,
    with_grads=True)``, which gathers every FSDP1 parameter (and gradient) of the module at once: memory for a
    whole unsharded model, so keep it to rare steps. DTensors go through :func:`full_tensor`.
    """
    with summoned(layout.module, layout.fsdp1):
        grads = [_dense(full_tensor(local_grad_or_zeros(p))).detach().reshape(-1).clone() for p in layout.params]
        weights = [full_tensor(p.detach()).reshape(-1).clone() for p in layout.params]
    return grads, weights


def _dense(tensor: Tensor) -> Tensor:
    return tensor.to_dense() if tensor.is_sparse else tensor
