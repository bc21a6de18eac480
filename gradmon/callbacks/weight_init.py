"""Lightning adapter over :func:`gradmon.init.initialize`: initialise once as fitting starts, never over a
checkpoint."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gradmon._validation import check_int
from gradmon.callbacks._logging import log_text
from gradmon.init import (
    DEFAULT_TYPES,
    InitRecord,
    check_bias,
    compile_pattern,
    format_scheme,
    initialize,
    resolve_scheme,
    resolve_types,
)
from gradmon.tensorboard import markdown_table

RECORD_HEADER = ("layer", "scheme", "weight std before", "weight std after")


class WeightInit(Callback):
    r"""Initialise the weights of selected layers with a named scheme, once, when fitting starts.

    Schemes are those of :mod:`gradmon.init` (``normal``, ``uniform``, ``constant``, ``zeros``, ``ones``,
    ``xavier_uniform``, ``xavier_normal``, ``kaiming_uniform``, ``kaiming_normal``, ``lecun_uniform``,
    ``lecun_normal``, ``orthogonal``, ``trunc_normal``, and ``default``: the layer's own ``reset_parameters``), their
    arguments as keywords or in the string form ``"normal(std=0.01)"`` that configs use.

    Applied in ``on_fit_start``: after ``LightningModule.configure_model`` has built the layers and before the first
    training step. Never over restored weights: when ``trainer.fit(..., ckpt_path=...)`` resumes, or when this
    callback's state (restored from a checkpoint, or left by an earlier ``fit`` of the same instance) says it has
    already run, it leaves the weights alone. Several ``WeightInit`` callbacks apply in their order in
    ``callbacks``, so a later one overrides an earlier one on the layers it selects.

    Logged once, at fit start: a table with one row per layer (name, scheme, weight standard deviation before and
    after), printed on rank zero and written to every TensorBoard logger as text at step 0 under
    ``weight_init/<position>_<scheme>``, ``position`` being this callback's index among the Trainer's
    ``WeightInit`` callbacks. The rows are kept in :attr:`records`.

    Args:
        scheme: a scheme name, optionally with its arguments: ``"kaiming_normal"``, ``"normal(std=0.01)"``.
        types: the layer types to initialise, subclasses included, as classes or names (``"Linear"``,
            ``"torch.nn.Embedding"``). Normalisation layers and embeddings are only touched when listed here.
        include: a regular expression; only layers whose qualified name (from ``named_modules``) it finds are
            initialised.
        exclude: a regular expression; layers whose qualified name it finds are left alone.
        bias: ``"zeros"``, ``"keep"`` (untouched; ``default`` resets it with the layer's own rule) or a constant.
        seed: seeds a private ``torch.Generator``, so the global RNG is untouched and the same seed gives the same
            weights. Without it, draws come from the global RNG (on several processes, rank 0 draws a seed for all,
            because DDP has already copied rank 0's weights to the others when this runs).
        **arguments: the scheme's keyword arguments, e.g. ``std=0.01`` or ``nonlinearity="relu"``.

    Raises:
        ValueError: at construction, for an unknown scheme, unknown or invalid scheme arguments, a malformed string
            form, an unknown type, an invalid regular expression, bias or seed; at fit start, for a scheme that
            cannot apply to a selected layer (e.g. ``xavier_uniform`` on a 1-d weight).

    Example::

        trainer = Trainer(callbacks=[
            WeightInit("xavier_uniform", nonlinearity="tanh", seed=0),
            WeightInit("normal(std=0.01)", include=r"^head\.", seed=1),
        ])
    """

    def __init__(
        self,
        scheme: str,
        *,
        types: str | type | Sequence[str | type] = DEFAULT_TYPES,
        include: str | None = None,
        exclude: str | None = None,
        bias: str | float = "zeros",
        seed: int | None = None,
        **arguments: Any,
    ) -> None:
        self.scheme, self.arguments = resolve_scheme(scheme, arguments)
        self.types = resolve_types(types)
        self.include = compile_pattern("include", include)
        self.exclude = compile_pattern("exclude", exclude)
        self.bias = check_bias(bias)
        self.seed = check_int("seed", seed, allow_none=True)
        self.records: list[InitRecord] = []
        self._applied = False

    @cached_property  # Lightning reads it around every hook call
    def state_key(self) -> str:
        return self._generate_state_key(
            scheme=format_scheme(self.scheme, self.arguments),
            types=[t.__qualname__ for t in self.types],
            include=_pattern_text(self.include),
            exclude=_pattern_text(self.exclude),
            bias=self.bias,
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Under the default strategies the checkpoint is restored before this hook, so initialising now would
        # overwrite the saved weights; trainer.ckpt_path is already set by then.
        if self._applied or trainer.ckpt_path:
            rank_zero_info(f"WeightInit {format_scheme(self.scheme, self.arguments)}: skipped, weights restored.")
            return
        self.records = initialize(
            pl_module,
            self.scheme,
            types=self.types,
            include=self.include,
            exclude=self.exclude,
            bias=self.bias,
            generator=self._generator(trainer),
            **self.arguments,
        )
        self._applied = True
        table = markdown_table(RECORD_HEADER, [_row(record) for record in self.records])
        rank_zero_info(f"WeightInit {format_scheme(self.scheme, self.arguments)}:\n{table}")
        if trainer.is_global_zero:
            position = [c for c in trainer.callbacks if isinstance(c, WeightInit)].index(self)
            log_text(trainer, f"weight_init/{position}_{self.scheme}", table)

    def _generator(self, trainer: Trainer) -> torch.Generator | None:
        seed = self.seed
        if seed is None and trainer.world_size > 1:
            # DDP broadcast rank 0's weights while wrapping the model, before this hook; ranks drawing from their
            # own RNG states now would silently train different weights.
            seed = trainer.strategy.broadcast(int(torch.randint(2**62, (1,))))
        return None if seed is None else torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self._applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._applied = state_dict["applied"]


def _pattern_text(pattern: re.Pattern | None) -> str | None:
    return None if pattern is None else pattern.pattern


def _row(record: InitRecord) -> tuple[str, str, str, str]:
    return (
        record.layer or "(root)",
        format_scheme(record.scheme, record.arguments),
        f"{record.std_before:.4g}",
        f"{record.std_after:.4g}",
    )
