"""Lightning adapter over :func:`gradmon.init.initialize`: initialise once at the start of each fit, never over
weights restored from a checkpoint."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gradmon import tags
from gradmon._validation import check_bool, check_seed
from gradmon.callbacks._logging import log_text
from gradmon.init import (
    DEFAULT_TYPES,
    InitRecord,
    check_bias,
    check_weights,
    compile_pattern,
    initialize,
    resolve_types,
)
from gradmon.init_spec import format_scheme, resolve_scheme
from gradmon.tensorboard import markdown_table

RECORD_HEADER = ("layer", "scheme", "weight std before", "weight std after")


class WeightInit(Callback):
    r"""Initialise the weights of selected layers with a named scheme, once, when fitting starts.

    Schemes are those of :mod:`gradmon.init_schemes` (``normal``, ``uniform``, ``constant``, ``zeros``, ``ones``,
    ``xavier_uniform``, ``xavier_normal``, ``kaiming_uniform``, ``kaiming_normal``, ``lecun_uniform``,
    ``lecun_normal``, ``orthogonal``, ``trunc_normal``, and ``default``: the layer's own ``reset_parameters``), their
    arguments as keywords or in the string form ``"normal(std=0.01)"`` that configs use.

    Applied in ``on_fit_start``: after ``LightningModule.configure_model`` has built the layers and before the first
    training step. Never over restored weights: when ``trainer.fit(..., ckpt_path=...)`` resumes (whether or not this
    callback's state is in the checkpoint) it leaves the weights alone and prints that it skipped. Each ``fit``
    without ``ckpt_path`` initialises its model, also when the same instance served an earlier ``fit`` (a sweep, a
    notebook re-run): the state is reset in ``setup`` and only a checkpoint restores it. Several ``WeightInit``
    callbacks apply in their order in ``callbacks``, so a later one overrides an earlier one on the weights it
    selects.

    Each selected layer's weight tensors are initialised, each with its own fans: ``weight`` for most layers; every
    ``weight_ih_l*``, ``weight_hh_l*`` (and ``weight_hr_l*``) of ``RNN`` / ``LSTM`` / ``GRU``, ``_reverse`` included,
    the gates stacked along the first dimension as torch stores them (an LSTM's ``weight_hh_l0`` is one ``4H x H``
    matrix: fan_out ``4H``, and ``orthogonal`` makes that whole matrix semi-orthogonal); ``in_proj_weight`` of
    ``MultiheadAttention`` (``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` when key and value sizes differ;
    its ``out_proj`` is a ``Linear`` selected as such). ``bias_k`` / ``bias_v`` of attention are left alone.

    Logged once, at fit start: a table with one row per initialised weight tensor (``net.0`` for a layer's only
    ``weight``, ``lstm.weight_hh_l0`` otherwise; scheme; standard deviation before and after), printed on rank zero
    (with ``verbose``, the default) and written to every TensorBoard logger as text at step 0 under
    ``weight_init/<position>_<scheme>``, ``position`` being this callback's index among the Trainer's ``WeightInit``
    callbacks. The rows are kept in :attr:`records`, one :class:`~gradmon.init.InitRecord` per weight tensor. Names are
    the user's: the pieces that ``torch.compile`` (``_orig_mod``), FSDP1 and activation checkpointing insert are
    removed, in ``include`` / ``exclude`` matching too.

    Args:
        scheme: a scheme name, optionally with its arguments: ``"kaiming_normal"``, ``"normal(std=0.01)"``.
        types: the layer types to initialise, subclasses included, as classes or names (``"Linear"``,
            ``"torch.nn.Embedding"``). By default ``Linear``, ``Conv1d/2d/3d``, ``RNN``, ``LSTM``, ``GRU``, their
            cells and ``MultiheadAttention``; normalisation layers, embeddings, ``Bilinear`` and transposed
            convolutions are only touched when listed here. Your own ``nn.Module`` subclasses are accepted (and must
            have a ``weight`` tensor when fit starts); ``torch.nn`` classes without weights (``ReLU``,
            ``Sequential``) are refused.
        include: a regular expression; only layers whose module name (from ``named_modules``, cleaned) it finds
            are initialised.
        exclude: a regular expression; layers whose module name it finds are left alone.
        weights: a regular expression; only the weight tensors whose name within the layer it finds are
            initialised (``"weight_ih"``, ``"weight_hh"``, ``"in_proj"``); None, the default, takes them all. A
            ``Linear``'s one tensor is named ``weight``, so ``weights="weight_hh"`` leaves it alone. Not allowed
            with ``default``.
        bias: the biases of the initialised weights (``bias_hh_l0`` goes with ``weight_hh_l0``; attention's
            ``in_proj_bias`` with its in-projections): ``"zeros"``, ``"keep"`` (untouched; ``default`` resets it with
            the layer's own rule) or a constant.
        seed: an integer in [0, 2**64 - 1]; seeds a private ``torch.Generator``, so the global RNG is untouched and
            the same seed gives the same weights. Without it, draws come from the global RNG (on several processes,
            rank 0 draws a seed for all, because DDP has already copied rank 0's weights to the others when this
            runs).
        verbose: print the table at fit start (it is logged to TensorBoard and kept in :attr:`records` either way).
        **arguments: the scheme's keyword arguments, e.g. ``std=0.01`` or ``nonlinearity="relu"``. Numbers must
            stay within float32's range, and so must the values they draw.

    Raises:
        ValueError: at construction, naming the argument, for an unknown scheme, unknown or invalid scheme
            arguments (including values beyond float32's range), a malformed string form, an unknown or
            unsupported type, an invalid regular expression, bias or seed; at fit start, naming the weight, for a
            scheme that cannot apply to a selected weight (e.g. ``xavier_uniform`` on a 1-d weight), a selected layer
            without weights, or values that do not fit the weight's dtype (``std=1e5`` on a float16 model).

    Example::

        trainer = Trainer(callbacks=[
            WeightInit("xavier_uniform", nonlinearity="tanh", seed=0),
            WeightInit("normal(std=0.01)", include=r"^head\.", seed=1),
            WeightInit("orthogonal", types="LSTM", weights="weight_hh", seed=2),
        ])
    """

    def __init__(
        self,
        scheme: str,
        *,
        types: str | type | Sequence[str | type] = DEFAULT_TYPES,
        include: str | None = None,
        exclude: str | None = None,
        weights: str | None = None,
        bias: str | float = "zeros",
        seed: int | None = None,
        verbose: bool = True,
        **arguments: Any,
    ) -> None:
        self.scheme, self.arguments = resolve_scheme(scheme, arguments)
        self.types = resolve_types(types)
        self.include = compile_pattern("include", include)
        self.exclude = compile_pattern("exclude", exclude)
        self.weights = check_weights(weights, self.scheme)
        self.bias = check_bias(bias)
        self.seed = check_seed("seed", seed, allow_none=True)
        self.verbose = check_bool("verbose", verbose)
        self.records: list[InitRecord] = []
        self._applied = False

    @cached_property  # Lightning reads it around every hook call
    def state_key(self) -> str:
        # `weights` joins the key only when set, so checkpoints written before it existed still find their state.
        weights_key = {} if self.weights is None else {"weights": self.weights.pattern}
        return self._generate_state_key(
            scheme=format_scheme(self.scheme, self.arguments),
            types=[t.__qualname__ for t in self.types],
            include=_pattern_text(self.include),
            exclude=_pattern_text(self.exclude),
            bias=self.bias,
            **weights_key,
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # A new fit of a new model must be initialised even if this instance initialised an earlier one. Lightning
        # calls setup before it restores callback state, so a resumed fit still finds `applied` from its checkpoint.
        if stage == "fit":
            self._applied = False
            self.records = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Under the default strategies the checkpoint is restored before this hook, so initialising now would
        # overwrite the saved weights; trainer.ckpt_path is already set by then. `applied` can only be set here by
        # that restore (setup cleared it), so both mean the weights came from a checkpoint.
        if self._applied or trainer.ckpt_path:
            rank_zero_info(
                f"WeightInit {format_scheme(self.scheme, self.arguments)}: skipped, weights restored from "
                f"{trainer.ckpt_path or 'a checkpoint'}."
            )
            return
        self.records = initialize(
            pl_module,
            self.scheme,
            types=self.types,
            include=self.include,
            exclude=self.exclude,
            weights=self.weights,
            bias=self.bias,
            generator=self._generator(trainer),
            **self.arguments,
        )
        self._applied = True
        table = markdown_table(RECORD_HEADER, [_row(record) for record in self.records])
        if self.verbose:
            rank_zero_info(f"WeightInit {format_scheme(self.scheme, self.arguments)}:\n{table}")
        if trainer.is_global_zero:
            position = [c for c in trainer.callbacks if isinstance(c, WeightInit)].index(self)
            log_text(trainer, tags.tag(tags.WEIGHT_INIT, f"{position}_{self.scheme}"), table)

    def _generator(self, trainer: Trainer) -> torch.Generator | None:
        seed = self.seed
        if seed is None and trainer.world_size > 1:
            # DDP broadcast rank 0's weights while wrapping the model, before this hook; ranks drawing from their
            # own RNG states now would silently train different weights. Below 2**62: well inside manual_seed's range.
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
        record.name or "(root)",
        format_scheme(record.scheme, record.arguments),
        f"{record.std_before:.4g}",
        f"{record.std_after:.4g}",
    )
