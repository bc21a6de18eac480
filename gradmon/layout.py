"""Which tensors, which layers: :class:`ParamLayout`, the parameters of a model in registration order, the layer each
belongs to, their (device, dtype) groups and how they are sharded. Built once, used at every step by
:mod:`gradmon.norms`. This module never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from gradmon.naming import GroupBy, clean_name, layer_name
from gradmon.sharding import is_fsdp1_piece, local_tensor, shard_weights


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
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            local = local_tensor(p)
            by_key.setdefault((local.device, local.dtype), []).append(i)
        #: Indices into ``params`` per (device, dtype) group: one fused kernel each.
        self.groups = list(by_key.values())
        order = [i for g in self.groups for i in g]
        #: Puts the groups' results, concatenated, back into parameter order (``None``: they already are).
        self.unpermute = torch.argsort(torch.tensor(order)) if order != sorted(order) else None
        #: Whether FSDP1 pieces are among ``params`` (see :func:`gradmon.sharding.full_grads_and_weights`).
        self.fsdp1 = any(is_fsdp1_piece(p) for p in self.params)
        #: Weight of each local p-th-power sum in the world-wide sum (1 / replicas); ``None`` when nothing is sharded
        #: (no DTensor, no FSDP1 piece): every rank then holds whole tensors and no collective is needed.
        self.shard_weights = shard_weights(self.params, self.param_names, module, self.fsdp1)
        #: Whether any tensor is a shard (its norms then need a collective to be whole).
        self.sharded = self.shard_weights is not None
        #: Whether the norms are read as Python floats as soon as they are taken: whole tensors of one dtype in host
        #: memory, where reading waits for no device (see :func:`gradmon.norms.compute_norms`).
        self.read_at_once = (
            not self.sharded and len(self.groups) == 1 and local_tensor(self.params[0]).device.type == "cpu"
        )

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
