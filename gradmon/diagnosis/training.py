"""The learning rate, judged as the optimizer makes its steps: the update ratio of one step, and divergence, a
crawl or a collapse behind normalisation layers over the observed steps."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from gradmon.diagnosis.evidence import DEPTH_MIN_LAYERS, Evidence, LayerInfo
from gradmon.diagnosis.text import Finding, fmt, round_lr

#: Weights whose RMS moved more than this factor since the start were moved by training, not by the init.
DRIFT = 2.0
#: SGD: a median update ratio above this moves the weights by a tenth of their norm in one step, a hundredfold the
#: usual ~1e-3. Adam-like optimizers move each weight by about lr whatever the gradient, so for them the ratio only
#: says lr / RMS(w) (0.15 for a healthy GPT at lr 3e-3 with weights of RMS 0.02): they are judged by divergence.
UPDATE_RATIO_HIGH = 0.1
#: A median update ratio below this is a hundredfold below the usual ~1e-3, for any optimizer.
UPDATE_RATIO_LOW = 1e-5
#: A median update ratio below this (5x below the usual ~1e-3; healthy runs of the diagnosis zoo stay above 4.8e-4)
#: at :data:`SLOW_STEPS` observed steps in a row, while the loss stays above :data:`LOSS_SLOW` of its first value:
#: training crawls.
UPDATE_RATIO_SLOW = 2e-4
SLOW_STEPS = 3
LOSS_SLOW = 0.8
#: The update ratio a suggested learning rate aims at: within the healthy runs' range (2e-3 to 1e-2 on SGD; for an
#: Adam-like optimizer, ADAPTIVE_STEP).
TARGET_RATIO = 1e-2
#: The loss this many times its first observed value: the run diverges (a healthy run's loss falls from the start).
LOSS_RISE = 1.5
#: Weights grown DRIFT-fold while the loss stays above this fraction of its first value: growth that buys nothing.
LOSS_STALL = 0.95
#: For an Adam-like optimizer, the suggested learning rate moves each weight by this fraction of the weights' initial
#: RMS per step (1e-3 for a GPT initialised N(0, 0.02)), and at most a tenth of the learning rate that diverged.
ADAPTIVE_STEP = 0.05
#: Warm-up suggested for a post-LN transformer that broke down without one: over this many times the steps it took
#: to break down (the ramp must span the phase that broke it several times over), and at least WARMUP_MIN steps.
WARMUP_SPAN = 3
WARMUP_MIN = 20
#: In a net with normalisation layers, whose scale the depth rule cannot read, a gradient at the first quarter of the
#: layers below this fraction of the last quarter's, once the weights grew DRIFT-fold, is a collapse the updates made
#: (the normalisation divides by activations that grew). Healthy recurrent and convolutional nets of the zoo stay
#: above 3e-2.
GRADIENT_COLLAPSE = 1e-2


def learning_rate(evidence: Evidence, found: Sequence[Finding]) -> list[Finding]:
    """The learning rate, judged as the optimizer uses it, and divergence over the observed steps.

    - SGD (and an unknown optimizer): a median update ratio above :data:`UPDATE_RATIO_HIGH` is too high.
    - Any optimizer: a median update ratio below :data:`UPDATE_RATIO_LOW`, or below :data:`UPDATE_RATIO_SLOW` at
      :data:`SLOW_STEPS` observed steps in a row while the loss stays above :data:`LOSS_SLOW` of its first value, is
      too low, unless a signal vanishing through depth (found beside it) explains the small gradients, or a schedule
      lowered the learning rate on purpose (below half its largest value so far).
    - Any optimizer, over the observed steps: the loss rising :data:`LOSS_RISE`-fold from its first value, or the
      weights grown :data:`DRIFT`-fold while it stays above :data:`LOSS_STALL` of it, is divergence (a post-LN
      transformer on an Adam-like optimizer without warm-up: no warm-up).
    """
    if any(f.condition.startswith(("forward", "backward")) or f.cause == "lr_too_high" for f in found):
        return []
    diverging = _divergence(evidence)
    if diverging is not None:
        return [diverging]
    ratios = {k: v for k, v in (evidence.update_ratios or {}).items() if math.isfinite(v) and v > 0}
    if not ratios:  # a ratio of exactly 0 is a step not taken (skipped, frozen), not a small learning rate
        return []
    median = statistics.median(ratios.values())
    if (median < UPDATE_RATIO_LOW or _crawling(evidence)) and not _annealed(evidence):
        return [_ratio_finding(evidence, ratios, median, low=True)]
    if median > UPDATE_RATIO_HIGH and not (evidence.optimizer is not None and evidence.optimizer.adaptive):
        return [_ratio_finding(evidence, ratios, median, low=False)]
    return []


def _ratio_finding(evidence: Evidence, ratios: dict[str, float], median: float, low: bool) -> Finding:
    """Learning rate too low or (SGD) too high, from the update ratio, with the learning rate to try: one that would
    make the ratio :data:`TARGET_RATIO` (an Adam-like optimizer's too-low one: :data:`ADAPTIVE_STEP`)."""
    optimizer = evidence.optimizer
    adaptive = optimizer is not None and optimizer.adaptive
    lr = optimizer.lr if optimizer is not None else math.nan
    name = f"{optimizer.name} at lr {fmt(lr)}" if optimizer is not None else "the optimizer"
    what = (f"the step changed the weights by {fmt(median)} of their norm (median over {len(ratios)} layers)"
            f" where about 1e-3 is usual")
    numbers = {"median update ratio": median, "usual": 1e-3}
    target = ADAPTIVE_STEP if adaptive and low else TARGET_RATIO
    new = round_lr(lr * min(1e3, target / median)) if math.isfinite(lr) else math.nan
    fix = {"lr": new} if math.isfinite(new) else {}
    if low:
        mechanism = ("it moves each weight by about lr" if adaptive
                     else "it moves each weight by lr times its gradient, and the gradients are not vanishing")
        losses = [r.loss for r in evidence.history if math.isfinite(r.loss)]
        if losses and math.isfinite(evidence.loss):
            mechanism += f"; the loss went from {fmt(losses[0])} to {fmt(evidence.loss)}"
        slow = tuple(k for k, v in ratios.items() if v < UPDATE_RATIO_SLOW)
        return Finding(
            evidence.step, "update_ratio_low", "lr_too_low", slow, f"{what}: {name}; {mechanism}",
            f"a larger learning rate ({fmt(new)})" if fix else "a larger learning rate", numbers, fix, "weights",
        )
    fast = tuple(k for k, v in ratios.items() if v > UPDATE_RATIO_HIGH)
    return Finding(
        evidence.step, "update_ratio_high", "lr_too_high", fast,
        f"{what}: {name} moves each weight by lr times its gradient, a tenth of the weights or more in one step",
        f"a smaller learning rate ({fmt(new)}), warm-up, or gradient clipping" if fix
        else "a learning rate 10 to 100 times smaller, warm-up, or gradient clipping",
        numbers, fix, "weights",
    )


def _crawling(evidence: Evidence) -> bool:
    """The update ratio below :data:`UPDATE_RATIO_SLOW` at the last :data:`SLOW_STEPS` observed steps, and the loss
    above :data:`LOSS_SLOW` of its first value."""
    records = [*evidence.history, evidence.record()][-SLOW_STEPS:]
    losses = [r.loss for r in [*evidence.history, evidence.record()] if math.isfinite(r.loss)]
    return (
        len(records) == SLOW_STEPS and all(r.update_ratio < UPDATE_RATIO_SLOW for r in records)
        and len(losses) >= 2 and losses[-1] > LOSS_SLOW * losses[0]
    )


def _annealed(evidence: Evidence) -> bool:
    """Whether a schedule brought the learning rate below half its largest value so far."""
    rates = [r.lr for r in [*evidence.history, evidence.record()] if math.isfinite(r.lr)]
    return bool(rates) and rates[-1] < 0.5 * max(rates)


def _divergence(evidence: Evidence) -> Finding | None:
    """The loss rising, or the weights growing while it does not fall, over the observed steps."""
    records = [*evidence.history, evidence.record()]
    losses = [r for r in records if math.isfinite(r.loss)]
    if len(losses) < 2 or not math.isfinite(evidence.loss) or losses[0].loss <= 0:
        return None
    first = losses[0]
    rise = evidence.loss / first.loss
    growth = evidence.weight_growth()
    numbers = {"loss": evidence.loss, "first loss": first.loss}
    if rise >= LOSS_RISE:
        what = f"the loss rose from {fmt(first.loss)} at step {first.step} to {fmt(evidence.loss)}"
    elif math.isfinite(growth) and growth > DRIFT and rise > LOSS_STALL:
        what = (f"the weights' RMS grew {fmt(growth)}x since the start while the loss went from {fmt(first.loss)} "
                f"at step {first.step} to {fmt(evidence.loss)}")
    else:
        return None
    if math.isfinite(growth):
        numbers["weight RMS change since start"] = growth
    layers = tuple(layer.name for layer in evidence.layers)
    optimizer = evidence.optimizer
    if optimizer is not None and optimizer.adaptive and evidence.post_norm and not _warming(evidence):
        return _warmup_finding(evidence, "divergence", layers, what, numbers)
    return lr_finding(evidence, "divergence", layers, what, numbers, "history")


def collapse_behind_norms(evidence: Evidence) -> list[Finding]:
    """In a net with normalisation layers (where :func:`signal_through_depth` cannot read the scale), weights grown
    :data:`DRIFT`-fold and a gradient at the first quarter of the layers (in registration order) below
    :data:`GRADIENT_COLLAPSE` of the last quarter's: the updates were too large (a post-LN transformer on an
    Adam-like optimizer without warm-up: no warm-up)."""
    grads = [(name, v) for name, v in (evidence.grad_norms or {}).items() if math.isfinite(v)]
    if not any(layer.normalized for layer in evidence.layers) or len(grads) < 2 * DEPTH_MIN_LAYERS:
        return []
    growth = evidence.weight_growth()
    if not (math.isfinite(growth) and growth > DRIFT):
        return []
    quarter = len(grads) // 4
    first = statistics.median(v for _, v in grads[:quarter])
    last = statistics.median(v for _, v in grads[-quarter:])
    if not last > 0 or first / last >= GRADIENT_COLLAPSE:
        return []
    numbers = {"first layers / last layers gradient": first / last, "weight RMS change since start": growth}
    what = (f"the gradient at the first {quarter} layers ({grads[0][0]}, ...) is {fmt(first / last)} of the last "
            f"{quarter} layers' while the weights' RMS grew {fmt(growth)}x since the start: the normalisation layers "
            "divide by activations the updates made large, and pass little gradient back")
    layers = tuple(name for name, _ in grads[:quarter])
    optimizer = evidence.optimizer
    if optimizer is not None and optimizer.adaptive and evidence.post_norm and not _warming(evidence):
        return [_warmup_finding(evidence, "backward_decay", layers, what, numbers)]
    return [lr_finding(evidence, "backward_decay", layers, what, numbers, "activations")]


def _warming(evidence: Evidence) -> bool:
    """Whether the learning rate rose over the observed steps (a warm-up)."""
    records = [*evidence.history, evidence.record()]
    return any(r.lr < records[-1].lr for r in records[:-1] if math.isfinite(r.lr))


def _warmup_finding(
    evidence: Evidence, condition: str, layers: Sequence[str], what: str, numbers: dict[str, float],
) -> Finding:
    optimizer = evidence.optimizer
    assert optimizer is not None
    steps = max(WARMUP_MIN, WARMUP_SPAN * evidence.step)
    return Finding(
        evidence.step, condition, "no_warmup", tuple(layers),
        f"{what}; a post-LN transformer (LayerNorm after each residual sum) on {optimizer.name} at lr "
        f"{fmt(optimizer.lr)} from the first step takes early updates too large for it",
        f"a linear learning-rate warm-up over the first {steps} steps or more (or pre-LN blocks)",
        numbers, {"warmup_steps": steps}, "history",
    )


def weight_drift(evidence: Evidence, layers: Sequence[LayerInfo]) -> float | None:
    """The median factor the weights' RMS of ``layers`` moved by since the start, when beyond :data:`DRIFT`."""
    move = evidence.weight_growth(layers)
    return move if math.isfinite(move) and not 1 / DRIFT <= move <= DRIFT else None


def lr_finding(
    evidence: Evidence, condition: str, layers: Sequence[str], what: str, numbers: dict[str, float], basis: str,
) -> Finding:
    """Learning rate too high, with the learning rate to try: for an Adam-like optimizer, one that moves each weight
    by :data:`ADAPTIVE_STEP` of the weights' initial RMS per step (at most a tenth of the current one); for SGD, a
    tenth of the current one."""
    optimizer = evidence.optimizer
    new = math.nan
    if optimizer is not None and math.isfinite(optimizer.lr):
        new = optimizer.lr / 10
        initial = [v for v in (evidence.initial_weight_rms or {}).values() if math.isfinite(v) and v > 0]
        if optimizer.adaptive and initial:
            new = min(new, ADAPTIVE_STEP * statistics.median(initial))
        new = round_lr(new)
    mechanism = ""
    if optimizer is not None:
        mechanism = (f" ({optimizer.name} moves each weight by about lr = {fmt(optimizer.lr)} a step)" if
                     optimizer.adaptive else f" ({optimizer.name} at lr {fmt(optimizer.lr)})")
    return Finding(
        evidence.step, condition, "lr_too_high", tuple(layers), what + mechanism,
        (f"a smaller learning rate ({fmt(new)})" if math.isfinite(new) else "a learning rate 10 to 100 times smaller")
        + ", warm-up, or gradient clipping", numbers, {"lr": new} if math.isfinite(new) else {}, basis,
    )

