"""Per-layer norms of gradients, weights and updates: fused, sync-free, and correct under sharding.

The expensive part of per-layer norms is not the arithmetic but the bookkeeping around it: one kernel launch per
tensor and one host sync per value. Here the tensors of a :class:`ParamLayout` are grouped once by (device, dtype),
each group goes through a single ``torch._foreach_norm`` (as ``torch.nn.utils.get_total_norm`` does), the results
are stacked into one vector that stays on the device, and the caller decides when to pay for one transfer.

Sharded tensors (``DTensor``, as produced by FSDP2 / ``fully_shard``; and FSDP1's ``FullyShardedDataParallel``
with ``use_orig_params=True``, whose parameters are each rank's flat piece) are reduced with one collective over the
stacked vector of p-th-power sums (max for the inf-norm), so each layer's norm equals the norm of the full tensor.

This module never imports Lightning.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from functools import partial
from math import hypot
from operator import is_

import torch
from torch import Tensor, nn

from gradmon._validation import check_choice, check_norm_type
from gradmon.naming import GroupBy, clean_name, layer_name
from gradmon.sharding import dist, is_fsdp1_piece, local_grad_or_zeros, local_tensor, shard_weights


class ParamLayout:
    """Parameters in registration order, the layer each belongs to, and their (device, dtype) groups.

    Built once per set of parameters and reused every step, so the per-step cost is the kernels alone.

    ``module`` is the model the parameters belong to, needed only when FSDP1 (``FullyShardedDataParallel``) holds
    them: the flat pieces carry no trace of how they were sharded, the FSDP1 instances inside ``module`` do. It must
    contain every FSDP1 instance that owns one of ``params``, so pass the outermost model (under Lightning:
    ``trainer.strategy.model``, which is the FSDP1 wrapper when the strategy wrapped the LightningModule itself).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        param_names: Sequence[str],
        param_layers: Sequence[str],
        *,
        module: nn.Module | None = None,
    ) -> None:
        self.params = list(params)
        self.param_names = list(param_names)
        self.param_layers = list(param_layers)
        self.module = module
        #: Layer names in first-seen (registration) order.
        self.layer_names: list[str] = list(dict.fromkeys(self.param_layers))
        index = {name: j for j, name in enumerate(self.layer_names)}
        self.layer_of_param = [index[name] for name in self.param_layers]

        by_key: dict[tuple[torch.device, torch.dtype, bool], list[int]] = {}
        for i, p in enumerate(self.params):
            local = local_tensor(p)
            by_key.setdefault((local.device, local.dtype, _blas_friendly(local)), []).append(i)
        #: Indices into ``params`` per (device, dtype) group: one fused kernel each (large CPU tensors apart).
        self.groups = list(by_key.values())
        #: Per group: whether its 2-norms are taken with BLAS dot products (see :func:`_group_norms`).
        self.group_uses_dot = [key[2] for key in by_key]
        order = [i for g in self.groups for i in g]
        # Puts the concatenated group results back into parameter order.
        self._unpermute = torch.argsort(torch.tensor(order)) if order != sorted(order) else None
        # Weight of each local p-th-power sum in the world-wide sum (1 / replicas); None when nothing is sharded
        # (no DTensor, no FSDP1 piece), in which case every rank already holds whole tensors and no collective is
        # needed.
        #: Whether FSDP1 pieces are among ``params`` (see :func:`gradmon.sharding.full_grads_and_weights`).
        self.fsdp1 = any(is_fsdp1_piece(p) for p in self.params)
        self._shard_weights = shard_weights(self.params, self.param_names, module, self.fsdp1)
        #: Whether any tensor is a shard (its norms then need a collective to be whole).
        self.sharded = self._shard_weights is not None
        # Decided once here rather than at every step (the per-step path runs inside a training loop, where every
        # extra line of Python counts): whether per-tensor norms can be left as the kernels' scalars
        # (:func:`norm_parts`: nothing sharded, and one group or all of them in host memory), and whether each
        # layer's parameters sit side by side.
        #: Whether every tensor is in host memory (its norms can then be read one by one, without a device sync).
        self.on_cpu = all(local_tensor(p).device.type == "cpu" for p in self.params)
        self.partwise = self._shard_weights is None and (len(self.groups) == 1 or self.on_cpu)
        #: Whether norms of tensors laid out as ``params`` are read as Python floats as soon as they are taken
        #: (:func:`host_norms`): whole (unsharded) tensors in host memory, where reading waits for no device.
        self.floats_at_once = self.on_cpu and not self.sharded and _FLOATS_AT_ONCE_ON_CPU
        #: The dtype of :func:`stacked_norms`' vector: float64 when any tensor is, else float32.
        self.vector_dtype = (
            torch.float64 if any(local_tensor(p).dtype == torch.float64 for p in self.params) else torch.float32
        )
        self.layer_spans = _spans(self.layer_of_param)
        #: ``k`` when every layer holds ``k`` consecutive parameters (a weight and a bias: 2), else ``None``: the
        #: layers' 2-norms are then one ``map(hypot, ...)`` over strided slices (see :meth:`Norms.per_layer`).
        widths = {b - a for a, b in self.layer_spans} if self.layer_spans else set()
        self.layer_width = widths.pop() if len(widths) == 1 else None

    def __len__(self) -> int:
        return len(self.params)

    def layer_index(self, device: torch.device) -> Tensor:
        """``layer_of_param`` as an index tensor on ``device`` (made once per device)."""
        cache = self.__dict__.setdefault("_layer_index", {})
        index = cache.get(device)
        if index is None:
            index = torch.tensor(self.layer_of_param, dtype=torch.long)
            if device.type == "cuda":  # from pinned memory, without a sync even on the first step
                index = index.pin_memory().to(device, non_blocking=True)
            index = cache[device] = index.to(device)
        return index

    @classmethod
    def from_named_parameters(
        cls,
        named_params: Iterable[tuple[str, Tensor]],
        group_by: GroupBy = "layer",
        *,
        module: nn.Module | None = None,
    ) -> ParamLayout:
        """Layout of the given parameters under their cleaned names (:func:`gradmon.naming.clean_name`); a tensor
        seen twice (tied weights) is counted once, under its first name.

        ``module``: the outermost model, so that FSDP1 pieces can be weighted by how they are sharded (see the
        class docstring); FSDP1 pieces without it, or with an FSDP1 configuration gradmon cannot weight, raise
        ``ValueError`` rather than give one rank's piece as the whole.
        """
        seen: set[int] = set()
        params, names = [], []
        for name, p in named_params:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
                names.append(clean_name(name))
        return cls(params, names, [layer_name(n, group_by) for n in names], module=module)

    def subset(self, keep: Sequence[int]) -> ParamLayout:
        """The layout of some of the parameters (those with a gradient this step, say)."""
        return ParamLayout(
            [self.params[i] for i in keep],
            [self.param_names[i] for i in keep],
            [self.param_layers[i] for i in keep],
            module=self.module,
        )


def stacked_norms(layout: ParamLayout, tensors: Sequence[Tensor], norm_type: float) -> Tensor:
    """The p-norm of each tensor's local data as one vector (float32, or float64 when any tensor is) on the first
    group's device, in input order.

    ``tensors[i]`` must have the device and dtype of ``layout.params[i]`` (gradients, weights and updates do) and
    must not require grad (gradients never do; pass weights detached). No host sync happens here.
    """
    locals_ = [local_tensor(t) for t in tensors] if layout.sharded else tensors
    if layout.sharded and math.isinf(norm_type):
        # A rank may hold no element of a parameter (uneven shards); the inf-norm of nothing is an error in torch,
        # and 0 is what a max over norms needs.
        locals_ = [t if t.numel() else t.new_zeros(1) for t in locals_]
    if len(layout.groups) == 1:
        return _group_norms(locals_, norm_type, layout.group_uses_dot[0])
    device = locals_[layout.groups[0][0]].device
    parts = [
        _group_norms([locals_[i] for i in group], norm_type, dot).to(device)
        for group, dot in zip(layout.groups, layout.group_uses_dot)
    ]
    stacked = torch.cat(parts)
    return stacked[layout._unpermute.to(device)] if layout._unpermute is not None else stacked


# On the CPU, torch's norm kernel runs on one thread; for the 2-norm of a large float tensor a BLAS dot product
# (multi-threaded, SIMD) is faster and closer to the float64 norm. Below this size the per-tensor call costs more than
# the fused kernel saves.
_DOT_MIN_NUMEL = 1 << 14


def _spans(layer_of_param: Sequence[int]) -> list[tuple[int, int]] | None:
    """``[(start, end)]`` per layer when each layer's parameters are consecutive (as registration order makes them),
    else ``None``."""
    spans: list[tuple[int, int]] = []
    for i, layer in enumerate(layer_of_param):
        if layer == len(spans):
            spans.append((i, i + 1))
        elif layer == len(spans) - 1 and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            return None
    return spans


def _blas_friendly(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.numel() >= _DOT_MIN_NUMEL


#: Whether layouts in host memory read their norms as Python floats at once (:attr:`ParamLayout.floats_at_once`); off,
#: the CPU takes the path a GPU takes: tests turn it off to run that path where there is no GPU.
_FLOATS_AT_ONCE_ON_CPU = True


def norm_parts(layout: ParamLayout, tensors: Sequence[Tensor], norm_type: float) -> Sequence[Tensor]:
    """The p-norm of each tensor (laid out as ``layout.params``, which must be ``partwise``) as 0-d tensors, in
    input order: the kernels' own results, neither stacked nor reordered. No host sync."""
    groups = layout.groups
    if len(groups) == 1:
        return _group_parts(tensors, norm_type, layout.group_uses_dot[0])
    out: list[Tensor] = list(tensors)
    for group, dot in zip(groups, layout.group_uses_dot):
        for i, norm in zip(group, _group_parts([tensors[i] for i in group], norm_type, dot)):
            out[i] = norm
    return out


def _group_parts(tensors: Sequence[Tensor], norm_type: float, dot: bool) -> Sequence[Tensor]:
    """Norms of tensors of one device and dtype, one 0-d tensor each: one fused ``_foreach_norm``, accumulated in at
    least float32 (bf16 and fp16 norms would lose digits; float64 cannot be narrowed); or, for the 2-norm of large
    CPU tensors, dots."""
    if dot and norm_type == 2.0:
        squares = [torch.dot(f, f) for f in (t.reshape(-1) for t in tensors)]
        torch._foreach_sqrt_(squares)
        return squares
    if tensors[0].dtype in (torch.float32, torch.float64):  # already accumulated in full precision: the fast path
        return torch._foreach_norm(tensors, norm_type)
    return torch._foreach_norm(tensors, norm_type, dtype=torch.promote_types(tensors[0].dtype, torch.float32))


def _group_norms(tensors: list[Tensor], norm_type: float, dot: bool = False) -> Tensor:
    """Norms of tensors of one device and dtype as one vector: :func:`_group_parts` stacked."""
    return torch.stack(list(_group_parts(tensors, norm_type, dot)))


def global_power_sums(local_norms: Tensor, shard_weights: Tensor, norm_type: float) -> Tensor:
    """Turn per-rank local norms into world-wide ones with a single collective (float64 p-th-power sums, or
    maxima for inf), weighting replicated pieces so each element counts once. Returns p-th powers (inf: maxima)."""
    if math.isinf(norm_type):
        out = local_norms.double()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out
    out = local_norms.double().pow(norm_type) * shard_weights.to(local_norms.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def combine(values: Sequence[float], groups: Sequence[int], num_groups: int, norm_type: float, power_sums: bool = False
            ) -> tuple[list[float], float]:
    """Combine per-tensor norms (or p-th-power sums, when ``power_sums``) on the host into per-group norms and a total.

    Done in Python doubles after the single transfer: for a few dozen values this is cheaper than more kernels.
    """
    if math.isinf(norm_type):
        acc = [0.0] * num_groups
        for v, g in zip(values, groups):
            if v > acc[g] or v != v:
                acc[g] = v
        return acc, max(acc, default=0.0) if all(a == a for a in acc) else math.nan
    p = norm_type
    acc = [0.0] * num_groups
    if power_sums:
        for v, g in zip(values, groups):
            acc[g] += v
    elif p == 2.0:
        for v, g in zip(values, groups):
            acc[g] += v * v
    else:
        for v, g in zip(values, groups):
            acc[g] += _pow(v, p)
    total = sum(acc)
    return [_root(a, p) for a in acc], _root(total, p)


def _pow(v: float, p: float) -> float:
    try:
        return v**p
    except OverflowError:
        return math.inf


def _root(v: float, p: float) -> float:
    return math.sqrt(v) if p == 2.0 else v ** (1.0 / p)


_CPU = torch.device("cpu")
_is_none = partial(is_, None)


class Norms:
    """Norms of one set of tensors at one step. ``device_values`` stays on the device until :meth:`host` is called.

    ``device_values`` holds per-tensor norms, or (``power_sums=True``) world-wide p-th-power sums after a collective.
    It may be given as ``parts``, the fused kernel's 0-d results on one device, stacked only when a vector is asked
    for; or as ``host``, the values already read as Python floats (:func:`host_norms`, in host memory), made into a
    vector only if one is asked for.
    """

    __slots__ = ("layout", "norm_type", "power_sums", "_values", "_parts", "_host", "_layers")

    def __init__(
        self,
        layout: ParamLayout,
        device_values: Tensor | None,
        norm_type: float,
        power_sums: bool = False,
        *,
        parts: Sequence[Tensor] | None = None,
        host: list[float] | None = None,
    ) -> None:
        if device_values is None and parts is None and host is None:
            raise TypeError("Norms needs device_values, parts or host")
        self.layout = layout
        self.norm_type = norm_type
        self.power_sums = power_sums
        self._values = device_values
        self._parts = parts
        self._host = host
        self._layers: tuple[dict[str, float], float] | None = None

    @property
    def device_values(self) -> Tensor:
        """Per-tensor values as one device vector (made from the host values when only those were given)."""
        if self._values is None:
            if self._parts is not None:
                self._values = torch.stack(self._parts)  # type: ignore[arg-type]
            else:
                self._values = torch.tensor(self._host, dtype=self.layout.vector_dtype)
        return self._values

    @property
    def device(self) -> torch.device:
        """Where the values are (without stacking the kernels' scalars to find out)."""
        if self._values is not None:
            return self._values.device
        return self._parts[0].device if self._parts is not None else _CPU

    def host(self) -> list[float]:
        """Per-tensor values as Python floats: the one host transfer, done at most once."""
        if self._host is None:
            parts = self._parts
            if self._values is None and parts is not None and self.layout.on_cpu:
                self._host = read_host(parts)
            else:
                self._host = read_host(self.device_values)
        return self._host

    @property
    def on_host(self) -> bool:
        """Whether the values are already Python floats (taken in host memory, or transferred)."""
        return self._host is not None

    def set_host(self, values: list[float]) -> None:
        """Hand over values that were transferred together with other numbers."""
        self._host = values
        self._layers = None

    def per_layer(self) -> tuple[dict[str, float], float]:
        """``({layer: norm}, total)``, both of the full (unsharded) tensors; made once (the health rules and the
        logging step share it), so the dict must not be changed."""
        if self._layers is None:
            self._layers = self._per_layer()
        return self._layers

    def _per_layer(self) -> tuple[dict[str, float], float]:
        layout = self.layout
        values = self.host()
        spans = layout.layer_spans
        if spans is not None and self.norm_type == 2.0 and not self.power_sums:
            # The usual case, every step: a C-level hypot per layer (exact to an ulp, and it cannot overflow); when
            # every layer has k parameters, hypot is mapped over k strided slices, with no Python frame per layer.
            k = layout.layer_width
            if k == 2:  # a weight and a bias per layer: the most common layout, without a generator
                layers = list(map(hypot, values[0::2], values[1::2]))
            elif k is None:
                layers = [hypot(*values[a:b]) for a, b in spans]
            else:
                layers = list(map(hypot, *(values[i::k] for i in range(k))))
            total = hypot(*layers)
            if total == math.inf:  # hypot says inf for inf beside NaN, where the norm is NaN
                layers = [math.nan if v == math.inf and any(x != x for x in values[a:b]) else v
                          for v, (a, b) in zip(layers, spans)]
                total = math.nan if any(v != v for v in layers) else total
        else:
            layers, total = combine(values, layout.layer_of_param, len(layout.layer_names), self.norm_type,
                                    self.power_sums)
        return dict(zip(layout.layer_names, layers)), total

    def divided_by(self, scale: Tensor) -> Norms:
        """The norms of the tensors divided by ``scale`` (a device scalar): norms scale linearly, p-th-power sums by
        ``scale ** p`` (inf-norm maxima linearly). No host sync."""
        factor = scale if not self.power_sums or math.isinf(self.norm_type) else scale**self.norm_type
        return Norms(self.layout, self.device_values / factor.to(self.device_values), self.norm_type, self.power_sums)

    def device_layer_norms(self) -> Tensor:
        """Per-layer norms of the full tensors, then their total, as one float64 vector on the device: the same
        numbers as :meth:`per_layer`, computed without leaving the device (for decisions that must not sync)."""
        layout = self.layout
        values = self.device_values.double()
        index = layout.layer_index(values.device)
        layers = torch.zeros(len(layout.layer_names), dtype=values.dtype, device=values.device)
        if math.isinf(self.norm_type):
            layers.scatter_reduce_(0, index, values, "amax")
            # amax ignores NaN in some kernels: a NaN in a layer must make that layer NaN.
            nan = torch.zeros_like(layers).index_add_(0, index, values * 0.0)
            layers = layers + nan
            total = layers.max().reshape(1)
        else:
            powers = values if self.power_sums else values.pow(self.norm_type)
            layers.index_add_(0, index, powers)
            total = layers.sum().reshape(1)
            root = 1.0 / self.norm_type
            layers, total = layers.pow(root), total.pow(root)
        return torch.cat([layers, total])


def read_host(tensor: Tensor | Sequence[Tensor]) -> list[float]:
    """A device vector as Python floats: a blocking transfer, which on a GPU waits for every queued kernel. Every such
    read of gradmon goes through here, so a test can count them. A list of CPU scalars is read one by one (cheaper
    than stacking them; never given device tensors, where each read would be a sync)."""
    if not isinstance(tensor, Tensor):
        return list(map(Tensor.item, tensor))  # C-level iteration: no Python frame per value
    return tensor.tolist()


def host_norms(layout: ParamLayout, tensors: Sequence[Tensor], norm_type: float) -> Norms:
    """The norms of ``tensors`` (laid out as ``layout.params``, which must be ``floats_at_once``) read as Python floats
    at once: the fused kernels' scalars (:func:`norm_parts`) read one by one, no 0-d tensor kept and nothing to stack
    or copy later.
    """
    return Norms(layout, None, norm_type, host=read_host(norm_parts(layout, tensors, norm_type)))


def compute_norms(layout: ParamLayout, tensors: Sequence[Tensor], norm_type: float) -> Norms:
    """Fused norms of ``tensors`` (laid out as ``layout.params``), with one collective when sharded."""
    if layout.floats_at_once:
        return host_norms(layout, tensors, norm_type)
    return reduce_norms(layout, [stacked_norms(layout, tensors, norm_type)], norm_type)[0]


def reduce_norms(layout: ParamLayout, local: Sequence[Tensor], norm_type: float) -> list[Norms]:
    """Several vectors of this rank's :func:`stacked_norms` (weights and updates, say) made whole, sharing one
    collective when the layout is sharded."""
    if not layout.sharded:
        return [Norms(layout, values, norm_type) for values in local]
    n = len(layout)
    both = global_power_sums(torch.cat(list(local)), layout._shard_weights.repeat(len(local)), norm_type)
    return [Norms(layout, both[i * n : (i + 1) * n], norm_type, power_sums=True) for i in range(len(local))]


def transfer(norms: Sequence[Norms]) -> None:
    """Bring several :class:`Norms` to the host in one transfer (those already there are left alone)."""
    pending = [n for n in norms if n._host is None]
    if not pending:
        return
    hand_out(pending, read_host(concatenated(pending)))


def concatenated(norms: Sequence[Norms]) -> Tensor:
    """The device values of several :class:`Norms` as one vector, to cross to the host in one transfer."""
    device = norms[0].device_values.device
    return torch.cat([n.device_values.to(device) for n in norms])


def hand_out(norms: Sequence[Norms], values: Sequence[float]) -> None:
    """Give each :class:`Norms` its slice of ``values``, the host copy of :func:`concatenated` of them."""
    start = 0
    for n in norms:
        n.set_host(list(values[start : start + len(n.layout)]))
        start += len(n.layout)


def has_nonfinite(tensor: Tensor) -> bool:
    """Whether a tensor's local data holds a NaN or an inf (a norm can overflow to inf on finite values)."""
    return not bool(torch.isfinite(sparse_values(local_tensor(tensor))).all())


class GradientNorms:
    """Fused gradient norms of one layout, step after step, whichever of its parameters have a gradient.

    A parameter without a gradient at a step (frozen, not yet unfrozen, unused) is left out of that step; the layout
    of those that have one is cached by which they are, so a stable set costs one scan of ``p.grad`` per step. Under
    sharding every rank must take the same layout for the collective to line up: all trainable parameters are kept,
    and a rank whose piece has no gradient contributes zeros.
    """

    def __init__(self, layout: ParamLayout, norm_type: float = 2.0) -> None:
        self.layout = layout
        self.norm_type = norm_type
        self._subsets: dict[tuple[int, ...], ParamLayout] = {}
        # Whether sparse gradients (nn.Embedding(sparse=True)) have been seen: found by the norm kernels refusing
        # them, so that dense models pay nothing for it.
        self._sparse = False

    def compute(self) -> Norms | None:
        """This step's norms (``None`` when no parameter has a gradient). No host sync.

        A sparse gradient is measured by its coalesced values (duplicate indices summed): the norm of the dense
        gradient it stands for."""
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
        if not grads:
            return None
        if self._sparse:
            grads = [sparse_values(g) for g in grads]
        try:
            return self._norms(layout, grads)
        except (NotImplementedError, RuntimeError):
            if self._sparse or not any(g.is_sparse for g in grads):
                raise
            self._sparse = True
            return self._norms(layout, [sparse_values(g) for g in grads])

    def _norms(self, layout: ParamLayout, grads: list[Tensor]) -> Norms:
        if layout.floats_at_once:  # in host memory: the norms as Python floats at once
            return host_norms(layout, grads, self.norm_type)
        if layout.partwise:  # on one device: the kernels' scalars, stacked only if a vector is asked for
            return Norms(layout, None, self.norm_type, parts=norm_parts(layout, grads, self.norm_type))
        return compute_norms(layout, grads, self.norm_type)


def sparse_values(tensor: Tensor) -> Tensor:
    """A sparse tensor's coalesced values (whose norms are those of the dense tensor); any other tensor as it is."""
    return tensor.coalesce().values() if tensor.is_sparse else tensor


#: ``torch._foreach_clone`` where this torch has it.
_foreach_clone = getattr(torch, "_foreach_clone", None)


class WeightSnapshot:
    """The weights of a layout before an optimizer step; after it, the norms of those weights and of the update.

    One copy of the weights (this rank's pieces), turned into ``w_before - w_after`` in place, so a snapshot costs
    the model's memory once. Taking it and finishing it make no host sync.
    """

    def __init__(self, layout: ParamLayout) -> None:
        self.layout = layout
        if layout.sharded or _foreach_clone is None:
            self._copy = [local_tensor(p).detach().clone() for p in layout.params]
        else:  # one call for every tensor (a third of a loop of clones on the CPU)
            with torch.no_grad():
                self._copy = list(_foreach_clone(layout.params))

    def finish(self, norm_type: float = 2.0) -> tuple[Norms, Norms]:
        """``(weights before, update)`` norms, after ``optimizer.step()``: one collective when sharded."""
        layout = self.layout
        if layout.floats_at_once:  # whole tensors in host memory: the norms as Python floats, no collective
            before = host_norms(layout, self._copy, norm_type)
            with torch.no_grad():
                torch._foreach_sub_(self._copy, layout.params)
            delta = host_norms(layout, self._copy, norm_type)
            self._copy = []
            return before, delta
        before = stacked_norms(layout, self._copy, norm_type)
        torch._foreach_sub_(self._copy, [local_tensor(p).detach() for p in layout.params])
        delta = stacked_norms(layout, self._copy, norm_type)
        self._copy = []
        weights, update = reduce_norms(layout, [before, delta], norm_type)
        return weights, update

    def update_ratios(self, norm_type: float = 2.0) -> dict[str, float]:
        """``{layer: ||w_after - w_before|| / ||w_before||}`` of the step just taken (one host transfer); layers whose
        weights were all zero are left out."""
        weights, update = self.finish(norm_type)
        transfer([weights, update])
        return update_ratios(weights, update)


def update_ratios(weights: Norms, update: Norms) -> dict[str, float]:
    """``{layer: update norm / weight norm}`` from the two :class:`Norms` of :meth:`WeightSnapshot.finish`."""
    weight_layers, _ = weights.per_layer()
    update_layers, _ = update.per_layer()
    return {layer: update_layers[layer] / w for layer, w in weight_layers.items() if w > 0}


# Plain-loop entry points keep one GradientNorms per (model, norm_type, group_by), dropped with the model.
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
