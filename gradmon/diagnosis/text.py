"""The diagnosis's words: what each condition and cause is called, and how a :class:`Finding` reads."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: What a finding is about, by code (``Finding.condition``), with its words.
CONDITIONS: dict[str, str] = {
    "nonfinite": "non-finite values",
    "forward_decay": "forward signal shrinks through depth",
    "forward_growth": "forward signal grows through depth",
    "backward_decay": "gradient shrinks on its way back through depth",
    "backward_growth": "gradient grows on its way back through depth",
    "saturation": "saturated activations",
    "dead_units": "dead units",
    "divergence": "training diverges",
    "update_ratio_high": "update ratio far above what the optimizer makes of a healthy step",
    "update_ratio_low": "update ratio far below the usual range",
}
#: The likely causes, by code (``Finding.cause``), with their words.
CAUSES: dict[str, str] = {
    "bad_op": "an operation that makes NaN or inf from finite inputs",
    "saturating_activation": "saturating activation",
    "init_too_small": "init scale too small",
    "init_too_large": "init scale too large",
    "gain_mismatch": "init gain mismatch",
    "dead_relu": "dead ReLUs",
    "lr_too_high": "learning rate too high",
    "no_warmup": "no learning-rate warm-up",
    "lr_too_low": "learning rate too low",
    "activation_overflow": "activation overflow",
    "gradient_spike": "gradient spike",
    "unknown": "cause not found",
}
#: Causes that cannot both be right: a verdict never names one while the other is its evidence.
OPPOSITES: dict[str, str] = {
    "lr_too_high": "lr_too_low", "lr_too_low": "lr_too_high", "no_warmup": "lr_too_low",
    "init_too_small": "init_too_large", "init_too_large": "init_too_small",
}

#: How a written finding is marked as cleared: the text ``**<condition>**: no longer found.`` at the step it cleared.
CLEARED = "no longer found."


@dataclass(frozen=True)
class Finding:
    """One thing found at one step.

    Attributes:
        step: The optimizer step whose evidence it rests on.
        condition: What is wrong (a key of :data:`CONDITIONS`).
        cause: The likely cause (a key of :data:`CAUSES`).
        layers: The layers it concerns, by the user's names, in forward order.
        explanation: Why this cause, in words and numbers.
        suggestion: What to change, in words.
        numbers: The numbers behind it, by name.
        fix: The suggestion as settings (see :data:`FIX_KEYS`), empty when it is not one setting.
        basis: What was measured: ``"activations"`` (the forward and backward signal of one batch), ``"weights"``
            (weights and gradient norms, the signal predicted from them), ``"history"`` (loss, weights and gradient
            norms over the observed steps), ``"values"`` (non-finite values found).
    """

    step: int
    condition: str
    cause: str
    layers: tuple[str, ...]
    explanation: str
    suggestion: str
    numbers: Mapping[str, float] = field(default_factory=dict)
    fix: Mapping[str, Any] = field(default_factory=dict)
    basis: str = "activations"

    def line(self) -> str:
        """One line: ``likely cause: <cause>: <explanation>; try: <suggestion>``."""
        return f"likely cause: {CAUSES[self.cause]}: {self.explanation}; try: {self.suggestion}"

    def markdown(self) -> str:
        """A paragraph for TensorBoard's text tab and the report."""
        numbers = ", ".join(f"{name} {fmt(value)}" for name, value in self.numbers.items())
        return (
            f"**{CONDITIONS[self.condition]}** at step {self.step}, in {layer_span(self.layers)}.  \n"
            f"Likely cause: **{CAUSES[self.cause]}**: {self.explanation}.  \nTry: {self.suggestion}."
            + (f"  \nNumbers: {numbers}." if numbers else "")
            + f"  \nEvidence: {BASES[self.basis]}."
        )

    def __str__(self) -> str:
        return f"step {self.step}: {CONDITIONS[self.condition]} in {layer_span(self.layers)}; {self.line()}"


#: What each ``Finding.basis`` means, for the texts.
BASES: dict[str, str] = {
    "activations": "the signal measured through the layers",
    "weights": "the weights and gradient norms (the signal predicted from them)",
    "history": "the loss and weights over the observed steps",
    "values": "where the non-finite values first appear",
}
#: The settings a :attr:`Finding.fix` may hold: each key is one change to the run.
FIX_KEYS: dict[str, str] = {
    "init": "a gradmon.WeightInit scheme for the weight layers",
    "init_recurrent": "a gradmon.WeightInit scheme for the recurrent (hidden-to-hidden) weights",
    "bias": "the value the biases start at",
    "activation": "the hidden layers' activation",
    "lr": "the learning rate",
    "warmup_steps": "a linear learning-rate warm-up over this many steps",
    "guard": "guard the operation (log(x + eps), x / (y + eps), log_softmax instead of log(softmax))",
}

#: The scheme to suggest per activation (string form, as WeightInit takes it); others get normal(std=...).
SUGGESTED_SCHEMES: dict[str, str] = {
    "ReLU": "kaiming_normal(nonlinearity='relu')",
    "ReLU6": "kaiming_normal(nonlinearity='relu')",
    "Tanh": "xavier_normal(gain=1.667)",
    "Sigmoid": "xavier_normal",
    "SELU": "lecun_normal",
}


def suggested_init(activation: str, need: float, fan_in: int) -> tuple[str, str]:
    """The scheme to suggest for ``activation`` at gain ``need`` and ``fan_in``, and the words that say it."""
    std = need / math.sqrt(fan_in)
    scheme = SUGGESTED_SCHEMES.get(activation, f"normal(std={std:.3g})")
    return scheme, (f"{scheme}: weights of RMS {need:.2f}/sqrt(fan_in) = {std:.3g} at fan_in {fan_in} "
                    f"(gradmon.WeightInit(\"{scheme}\"))")


def round_lr(lr: float) -> float:
    """A learning rate rounded to one significant digit (3e-3, not 0.0031623)."""
    if not (math.isfinite(lr) and lr > 0):
        return lr
    return float(f"{lr:.0e}")


def fmt(value: float) -> str:
    """A number in two significant digits, exponents without padding (1e-5, 3.2e4)."""
    return format(value, ".2g").replace("e+", "e").replace("e-0", "e-").replace("e0", "e")


def layer_span(layers: Sequence[str]) -> str:
    """Up to three layer names, or the first and last with the count."""
    if len(layers) <= 3:
        return ", ".join(layers)
    return f"{layers[0]} to {layers[-1]} ({len(layers)} layers)"
