"""Per-layer norms of gradients, weights and updates: fused, sync-free, and correct under sharding.

The expensive part of per-layer norms is not the arithmetic but the bookkeeping around it: one kernel launch per
tensor and one host sync per value. Here the tensors of a :class:`ParamLayout` are grouped once by (device, dtype),
each group goes through a single ``torch._foreach_norm`` (as ``torch.nn.utils.get_total_norm`` does), the results
are stacked into one vector that stays on the device, and the caller decides when to pay for one transfer.

Sharded tensors (``DTensor``, as produced by FSDP2 / ``fully_shard``; and FSDP1's ``FullyShardedDataParallel``
with ``use_orig_params=True``, whose parameters are each rank's flat piece) are reduced with one collective over the
stacked vector of p-th-power sums (max for the inf-norm), and the root is taken on the device, so that the vector
holds the norm of each full tensor, as it does without sharding.

Everything that depends on the order p of the norm is in :class:`NormOrder`. This module never imports Lightning.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from functools import partial
from operator import is_

import torch
from torch import Tensor, nn

from gradmon._validation import check_choice, check_norm_type
from gradmon.layout import ParamLayout
from gradmon.naming import GroupBy
from gradmon.sharding import dist, local_grad_or_zeros, local_tensor

# --- the order of the norm ----------------------------------------------------------------------------------------


class NormOrder:
    """The order ``p`` of a norm (any p > 0, or ``math.inf``) and the arithmetic that depends on it: the fused kernel,
    the collective that makes shards' norms whole, and the combination of tensors' norms into layers' norms, on the
    host and on the device. A NaN anywhere in a layer makes that layer's norm NaN (also beside an inf); p-th powers
    too large for a double make it inf."""

    __slots__ = ("p", "inf")

    def __init__(self, p: float) -> None:
        self.p = float(p)
        self.inf = math.isinf(self.p)

    def __repr__(self) -> str:
        return f"NormOrder({self.p})"

    def kernel(self, tensors: Sequence[Tensor]) -> Sequence[Tensor]:
        """Norms of tensors of one device and dtype, a 0-d tensor each: one fused ``_foreach_norm``, accumulated in at
        least float32 (bf16 and fp16 norms would lose digits; float64 is kept)."""
        dtype = tensors[0].dtype
        if dtype in (torch.float32, torch.float64):
            return torch._foreach_norm(tensors, self.p)
        return torch._foreach_norm(tensors, self.p, dtype=torch.promote_types(dtype, torch.float32))

    def fused(self, tensors: Sequence[Tensor]) -> Tensor:
        """:meth:`kernel`'s norms as one vector."""
        return torch.stack(self.kernel(tensors))

    def whole(self, local: Tensor, shard_weights: Tensor) -> Tensor:
        """Per-rank norms of pieces made norms of the whole tensors (float64) with one collective: maxima for the
        inf-norm, else p-th-power sums weighted so that each element counts once, then their root."""
        out = local.double()
        if self.inf:
            dist.all_reduce(out, op=dist.ReduceOp.MAX)
            return out
        out = out.pow(self.p) * shard_weights.to(out.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.sqrt() if self.p == 2.0 else out.pow(1.0 / self.p)

    def combine(self, values: Sequence[float], groups: Sequence[int], num_groups: int) -> tuple[list[float], float]:
        """Per-tensor norms combined on the host into per-group norms and their total, in Python doubles: for a few
        dozen values this is cheaper than more kernels."""
        acc = [0.0] * num_groups
        if self.inf:
            for v, g in zip(values, groups):
                if v > acc[g] or v != v:
                    acc[g] = v
            return acc, max(acc, default=0.0) if all(a == a for a in acc) else math.nan
        p = self.p
        if p == 2.0:
            for v, g in zip(values, groups):
                acc[g] += v * v  # overflows to inf, and NaN beside inf stays NaN (math.hypot would say inf)
            return list(map(math.sqrt, acc)), math.sqrt(sum(acc))
        for v, g in zip(values, groups):
            acc[g] += _pow(v, p)
        return [a ** (1.0 / p) for a in acc], sum(acc) ** (1.0 / p)

    def combine_on_device(self, values: Tensor, index: Tensor, num_groups: int) -> Tensor:
        """:meth:`combine` without leaving the device: per-group norms, then their total, as one float64 vector
        (``index``: the group of each value, on the device)."""
        values = values.double()
        groups = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
        if self.inf:
            groups.scatter_reduce_(0, index, values, "amax")
            # amax ignores NaN in some kernels: a NaN in a group must make that group NaN.
            nans = torch.zeros_like(groups).index_add_(0, index, torch.isnan(values).to(values.dtype))
            groups = groups.masked_fill(nans > 0, math.nan)
            return torch.cat([groups, groups.max().reshape(1)])
        groups.index_add_(0, index, values.pow(self.p))
        both = torch.cat([groups, groups.sum().reshape(1)])
        return both.sqrt() if self.p == 2.0 else both.pow(1.0 / self.p)


def _pow(v: float, p: float) -> float:
    try:
        return v**p
    except OverflowError:
        return math.inf


def _order(norm_type: float | NormOrder) -> NormOrder:
    return norm_type if isinstance(norm_type, NormOrder) else NormOrder(norm_type)


# --- the norms of one step ----------------------------------------------------------------------------------------


def _local_norms(layout: ParamLayout, tensors: Sequence[Tensor], order: NormOrder) -> Tensor:
    """The p-norm of each tensor's local data (this rank's piece when sharded) as one vector on the first group's
    device, in layout order: float32, or float64 when any tensor is. ``tensors[i]`` must have the device and dtype
    of ``layout.params[i]`` and must not require grad (pass weights detached). No host sync."""
    if layout.sharded:
        tensors = [local_tensor(t) for t in tensors]
        if order.inf:
            # A rank may hold no element of a parameter (uneven shards); the inf-norm of nothing is an error in torch,
            # and 0 is what a max over norms needs.
            tensors = [t if t.numel() else t.new_zeros(1) for t in tensors]
    groups = layout.groups
    if len(groups) == 1:
        return order.fused(tensors)
    device = tensors[groups[0][0]].device
    stacked = torch.cat([order.fused([tensors[i] for i in group]).to(device) for group in groups])
    return stacked[layout.unpermute.to(device)] if layout.unpermute is not None else stacked


def _whole(layout: ParamLayout, order: NormOrder, local: Sequence[Tensor]) -> list[Norms]:
    """Vectors of this rank's :func:`_local_norms` (weights and updates, say) made :class:`Norms` of the whole
    tensors, sharing one collective when the layout is sharded."""
    if not layout.sharded:
        return [Norms(layout, values, order) for values in local]
    n = len(layout)
    both = order.whole(torch.cat(list(local)), layout.shard_weights.repeat(len(local)))
    return [Norms(layout, both[i * n : (i + 1) * n], order) for i in range(len(local))]


def compute_norms(layout: ParamLayout, tensors: Sequence[Tensor], norm_type: float | NormOrder = 2.0) -> Norms:
    """Fused p-norms of ``tensors`` (laid out as ``layout.params``), with one collective when sharded. No host
    sync."""
    order = _order(norm_type)
    if layout.read_at_once:  # the kernel's scalars read one by one, unstacked: 0.5-1% of a 20x64 CPU step (benchmark)
        return Norms(layout, None, order, host=list(map(Tensor.item, order.kernel(tensors))))
    return _whole(layout, order, [_local_norms(layout, tensors, order)])[0]


class Norms:
    """Norms of one set of tensors at one step: the p-norm of each full (unsharded) tensor, in layout order, as one
    vector (``device_values``: float32, or float64 when any tensor is or after a collective) that stays on the device
    until :meth:`host` reads it, once."""

    __slots__ = ("layout", "order", "_values", "_host", "_layers")

    def __init__(
        self,
        layout: ParamLayout,
        device_values: Tensor | None,
        norm_type: float | NormOrder,
        *,
        host: list[float] | None = None,
    ) -> None:
        if device_values is None and host is None:
            raise TypeError("Norms needs device_values or host")
        self.layout = layout
        self.order = _order(norm_type)
        self._values = device_values
        self._host = host
        self._layers: tuple[dict[str, float], float] | None = None

    @property
    def device_values(self) -> Tensor:
        """The norms as one vector (made in host memory when they were read at once, see :func:`compute_norms`)."""
        if self._values is None:
            dtype = torch.float64 if self.layout.params[0].dtype == torch.float64 else torch.float32
            self._values = torch.tensor(self._host, dtype=dtype)
        return self._values

    @property
    def device(self) -> torch.device:
        """Where the values are."""
        return self.device_values.device if self._values is not None else torch.device("cpu")

    def host(self) -> list[float]:
        """Per-tensor norms as Python floats: the one host transfer, done at most once."""
        if self._host is None:
            self._host = read_host(self.device_values)
        return self._host

    @property
    def on_host(self) -> bool:
        """Whether the values have been read on the host."""
        return self._host is not None

    def set_host(self, values: list[float]) -> None:
        """Hand over values that were transferred together with other numbers."""
        self._host = values
        self._layers = None

    def per_layer(self) -> tuple[dict[str, float], float]:
        """``({layer: norm}, total)``, both of the full (unsharded) tensors; made once (the health rules and the
        logging step share it), so the dict must not be changed."""
        if self._layers is None:
            layout = self.layout
            layers, total = self.order.combine(self.host(), layout.layer_of_param, len(layout.layer_names))
            self._layers = dict(zip(layout.layer_names, layers)), total
        return self._layers

    def divided_by(self, scale: Tensor) -> Norms:
        """The norms of the tensors divided by ``scale`` (a device scalar). No host sync."""
        return Norms(self.layout, self.device_values / scale.to(self.device_values), self.order)

    def device_layer_norms(self) -> Tensor:
        """Per-layer norms, then their total, as one float64 vector on the device: the same numbers as
        :meth:`per_layer`, computed without leaving the device (for decisions that must not sync)."""
        values = self.device_values
        index = self.layout.layer_index(values.device)
        return self.order.combine_on_device(values, index, len(self.layout.layer_names))


def read_host(tensor: Tensor) -> list[float]:
    """A device vector as Python floats: a blocking transfer, which on a GPU waits for every queued kernel. Every such
    read of gradmon goes through here, so a test can count them."""
    return tensor.tolist()


def concatenated(norms: Sequence[Norms]) -> Tensor:
    """The device values of several :class:`Norms` as one vector, to cross to the host in one transfer."""
    device = norms[0].device
    return torch.cat([n.device_values.to(device) for n in norms])


def hand_out(norms: Sequence[Norms], values: Sequence[float]) -> None:
    """Give each :class:`Norms` its slice of ``values``, the host copy of :func:`concatenated` of them."""
    start = 0
    for n in norms:
        n.set_host(list(values[start : start + len(n.layout)]))
        start += len(n.layout)


def transfer(norms: Sequence[Norms]) -> None:
    """Bring several :class:`Norms` to the host in one transfer (those already there are left alone)."""
    pending = [n for n in norms if not n.on_host]
    if pending:
        hand_out(pending, read_host(concatenated(pending)))


def sparse_values(tensor: Tensor) -> Tensor:
    """A sparse tensor's coalesced values (whose norms are those of the dense tensor); any other tensor as it is."""
    return tensor.coalesce().values() if tensor.is_sparse else tensor


# --- step after step ----------------------------------------------------------------------------------------------


class GradientNorms:
    """Fused gradient norms of one layout, step after step, whichever of its parameters have a gradient.

    A parameter without a gradient at a step (frozen, not yet unfrozen, unused) is left out of that step; the layout
    of those that have one is cached by which they are, so a stable set costs one scan of ``p.grad`` per step. Under
    sharding every rank must take the same layout for the collective to line up: all trainable parameters are kept,
    and a rank whose piece has no gradient contributes zeros.
    """

    def __init__(self, layout: ParamLayout, norm_type: float | NormOrder = 2.0) -> None:
        self.layout = layout
        self.order = _order(norm_type)
        self._subsets: dict[tuple[int, ...], ParamLayout] = {}
        # Whether sparse gradients (nn.Embedding(sparse=True)) have been seen: found by the norm kernels refusing
        # them, so that dense models pay nothing for it.
        self._sparse = False

    @property
    def norm_type(self) -> float:
        return self.order.p

    def compute(self) -> Norms | None:
        """This step's norms (``None`` when no parameter has a gradient). No host sync.

        A sparse gradient is measured by its coalesced values (duplicate indices summed): the norm of the dense
        gradient it stands for."""
        layout, grads = self._present()
        if not grads:
            return None
        if self._sparse:
            grads = [sparse_values(g) for g in grads]
        try:
            return compute_norms(layout, grads, self.order)
        except (NotImplementedError, RuntimeError):
            if self._sparse or not any(g.is_sparse for g in grads):
                raise
            self._sparse = True
            return compute_norms(layout, [sparse_values(g) for g in grads], self.order)

    def _present(self) -> tuple[ParamLayout, list[Tensor]]:
        """The layout of the parameters that have a gradient now, and their gradients."""
        layout = self.layout
        if layout.sharded:
            keep: tuple[int, ...] | None = tuple(i for i, p in enumerate(layout.params) if p.requires_grad)
            grads = [local_grad_or_zeros(layout.params[i]) for i in keep]
        else:
            grads = [p.grad for p in layout.params]
            keep = None
            if any(map(_is_none, grads)):  # not `None in grads`: that calls Tensor.__eq__ on every gradient
                keep = tuple(i for i, g in enumerate(grads) if g is not None)
                grads = [grads[i] for i in keep]
        if keep is not None and len(keep) < len(layout):
            subset = self._subsets.get(keep)
            if subset is None:
                subset = self._subsets[keep] = layout.subset(keep)
            layout = subset
        return layout, grads


_is_none = partial(is_, None)

#: ``torch._foreach_clone`` where this torch has it.
_foreach_clone = getattr(torch, "_foreach_clone", None)


class WeightSnapshot:
    """The weights of a layout before an optimizer step; after it, the p-norms of those weights and of the update.

    One copy of the weights (this rank's pieces), turned into ``w_before - w_after`` in place, so a snapshot costs
    the model's memory once. Taking it and finishing it make no host sync on a device.
    """

    def __init__(self, layout: ParamLayout, norm_type: float | NormOrder = 2.0) -> None:
        self.layout = layout
        self.order = _order(norm_type)
        if layout.sharded or _foreach_clone is None:
            self._copy = [local_tensor(p).detach().clone() for p in layout.params]
        else:  # one call for every tensor (a third of a loop of clones on the CPU)
            with torch.no_grad():
                self._copy = list(_foreach_clone(layout.params))

    def finish(self) -> tuple[Norms, Norms]:
        """``(weights before, update)`` norms, after ``optimizer.step()``: one collective when sharded; read as floats
        at once where :func:`compute_norms` reads them so (no device to wait for)."""
        layout, order = self.layout, self.order
        measure = compute_norms if layout.read_at_once else _local_norms
        before = measure(layout, self._copy, order)
        with torch.no_grad():
            torch._foreach_sub_(self._copy, [local_tensor(p) for p in layout.params])
        delta = measure(layout, self._copy, order)
        self._copy = []
        if layout.read_at_once:
            return before, delta
        weights, update = _whole(layout, order, [before, delta])
        return weights, update

    def update_ratios(self) -> dict[str, float]:
        """``{layer: ||w_after - w_before|| / ||w_before||}`` of the step just taken (one host transfer); layers whose
        weights were all zero are left out."""
        weights, update = self.finish()
        transfer([weights, update])
        return update_ratios(weights, update)


def update_ratios(weights: Norms, update: Norms) -> dict[str, float]:
    """``{layer: update norm / weight norm}`` from the two :class:`Norms` of :meth:`WeightSnapshot.finish`."""
    weight_layers, _ = weights.per_layer()
    update_layers, _ = update.per_layer()
    return {layer: update_layers[layer] / w for layer, w in weight_layers.items() if w > 0}


# --- the plain-loop entry points ----------------------------------------------------------------------------------

# One GradientNorms per (model, norm_type, group_by), dropped with the model.
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[float, str], tuple[tuple[int, ...], GradientNorms]]] = (
    weakref.WeakKeyDictionary()
)


def _model_layout(model: nn.Module, group_by: GroupBy) -> ParamLayout:
    return ParamLayout.from_named_parameters(model.named_parameters(), group_by, module=model)


def layer_norms(
    model: nn.Module, norm_type: float | str = 2.0, group_by: GroupBy = "layer"
) -> tuple[dict[str, float], float]:
    """``({layer: gradient norm}, total)`` of every parameter of ``model`` that has a gradient now: the one call a
    plain PyTorch loop needs after ``loss.backward()``.

    Fused as the callbacks are (one ``_foreach_norm`` per device and dtype, one host transfer); frozen and unused
    parameters are left out; the layout is built once per model and reused while its parameters stay the same.
    ``norm_type`` is any p >= 0.25 or ``"inf"``; layers are the modules owning the parameters (``group_by="parameter"``
    keeps parameters apart), by the user's names. Returns ``({}, 0.0)`` when no parameter has a gradient.
    """
    p = check_norm_type("norm_type", norm_type)
    check_choice("group_by", group_by, ("layer", "parameter"))
    per_model = _CACHE.setdefault(model, {})
    signature = tuple(map(id, model.parameters()))
    cached = per_model.get((p, group_by))
    if cached is None or cached[0] != signature:
        cached = per_model[(p, group_by)] = (signature, GradientNorms(_model_layout(model, group_by), p))
    norms = cached[1].compute()
    return norms.per_layer() if norms is not None else ({}, 0.0)


def snapshot_weights(model: nn.Module, group_by: GroupBy = "layer") -> WeightSnapshot:
    """The trainable weights of ``model`` before ``optimizer.step()``; after it, ``.update_ratios()`` gives
    ``{layer: ||w_after - w_before|| / ||w_before||}``, whatever the optimizer::

        snapshot = snapshot_weights(model)
        optimizer.step()
        ratios = snapshot.update_ratios()
    """
    check_choice("group_by", group_by, ("layer", "parameter"))
    trainable = ((n, p) for n, p in model.named_parameters() if p.requires_grad)
    return WeightSnapshot(ParamLayout.from_named_parameters(trainable, group_by, module=model))
