"""A zoo of small, CPU-fast training runs to score gradmon's diagnosis against.

Each :class:`Case` is one training run (:class:`RunConfig`) with the cause the diagnosis should name
(:data:`gradmon.diagnosis.CAUSES` codes, plus ``"bad_op"`` and ``"no_warmup"``; ``None`` for a healthy run), the
healthy twin that differs only in the faulty setting, and the fix: the config overrides that the right advice amounts
to, so ``replace(case.config, **case.fix)`` must train. :func:`run` trains one config on synthetic data (made in
:mod:`experiments.zoo_models`, with the models; nothing is downloaded) with gradmon's monitors attached and returns
what happened (:class:`RunResult`).

The models span MLPs (ReLU, GELU, SiLU, tanh, sigmoid; with and without LayerNorm or BatchNorm), plain conv nets,
residual conv nets with BatchNorm, decoder-only transformers (pre-LN and post-LN, hand-written attention and
``nn.MultiheadAttention``, tied embeddings) and recurrent language models (RNN, LSTM, GRU); the optimisers SGD with
and without momentum, Adam and AdamW; fp32 and bf16-mixed.

Run ``python -m experiments.diagnosis_zoo`` (optionally with case names, or ``--no-fix``) for a table of every case,
its fixed run, and what gradmon found.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader

import gradmon
from experiments import lightning_quiet
from experiments.zoo_models import (
    BATCH,
    CLASSES,
    KAIMING,
    LANGUAGE_MODELS,
    LM_BATCH,
    RECURRENT,
    VOCAB,
    RunConfig,
    build_model,
    dataset,
    seeded_generator,
)
from gradmon import ActivationMonitor, GradHealthMonitor, GradientHealthWarning, WeightInit
from gradmon.diagnosis import needed_gain

#: A run trained when its loss over the last 5 steps is below this fraction of its loss over the first 5 and of
#: chance (the loss of a uniform guess): a net that starts far above chance (saturated logits) and falls 15% has
#: not trained.
TRAINED_FRACTION = 0.85


@dataclass(frozen=True)
class Case:
    """One run of the zoo.

    Attributes:
        name: unique, e.g. ``"init_too_small/relu_mlp"``.
        config: the run.
        expected: the cause the diagnosis should name, ``None`` for a healthy run.
        twin: the healthy twin's case name (sick cases).
        fix: the config overrides that the right advice amounts to; ``{}`` for a healthy run.
        note: what the case is, in one line.
    """

    name: str
    config: RunConfig
    expected: str | None
    twin: str | None
    fix: dict[str, Any]
    note: str


@dataclass
class RunResult:
    """What one run did.

    Attributes:
        config: the run.
        losses: the training loss of every step.
        first_loss: mean of the first 5 steps' losses (NaN if any is non-finite).
        last_loss: mean of the last 5 steps' losses.
        trained: every loss finite, ``last_loss < TRAINED_FRACTION * min(first_loss, chance)`` (chance: ln of
            the classes or the vocabulary) and no GradHealthMonitor flag.
        flagged: ``GradHealthMonitor.flagged_steps`` (steps flagged, by condition); empty without one.
        warnings: the messages of every :class:`~gradmon.GradientHealthWarning` raised during the run.
        findings: the first finding of each cause the ActivationMonitor found (``found.values()``).
        verdict: ``gradmon.verdict(trainer)`` where it exists, else the first of ``findings`` (or ``None``).
        trainer: the Trainer, for its callbacks.
        seconds: wall time of the fit.
    """

    config: RunConfig
    losses: list[float]
    first_loss: float
    last_loss: float
    trained: bool
    flagged: dict[str, int]
    warnings: list[str]
    findings: list[Any]
    verdict: Any
    trainer: Trainer | None = field(repr=False, default=None)
    seconds: float = 0.0

    @property
    def found(self) -> list[str]:
        """The causes found, in the order they were first found."""
        return [finding.cause for finding in self.findings]


# ---------------------------------------------------------------------------------------------------------------
# Data: fixed, synthetic, made here
# ---------------------------------------------------------------------------------------------------------------


class ZooModule(LightningModule):
    """Trains :func:`build_model`'s model on cross-entropy (or the planted ``log(softmax)``), recording each step's
    loss in :attr:`losses`."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        self.config = config
        self.net = build_model(config)
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x).float()
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        if self.config.bad_op == "log" and not self.config.guard:
            loss = F.nll_loss(torch.log(F.softmax(logits, dim=-1)), y)
        else:
            loss = F.cross_entropy(logits, y)
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        c = self.config
        params = self.parameters()
        optimizers = {
            "sgd": lambda: torch.optim.SGD(params, lr=c.lr),
            "sgd_momentum": lambda: torch.optim.SGD(params, lr=c.lr, momentum=0.9),
            "adam": lambda: torch.optim.Adam(params, lr=c.lr),
            "adamw": lambda: torch.optim.AdamW(params, lr=c.lr, weight_decay=0.01),
        }
        optimizer = optimizers[c.optimizer]()
        if not c.warmup_steps:
            return optimizer
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / c.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def init_callbacks(config: RunConfig) -> list[WeightInit]:
    """The WeightInit callbacks that apply ``init``, ``bias`` and ``init_recurrent``.

    ``init`` goes to the Linear / Conv / attention weights (the transformers' embeddings too, as nanoGPT does; of the
    recurrent layers only ``weight_ih``), their biases to ``bias`` (zeros when ``bias`` is None). ``bias`` alone
    resets the layers by their own rule and sets their biases to it.
    """
    callbacks: list[WeightInit] = []
    types: list[str] = ["Linear", "Conv2d", "MultiheadAttention", "RNN", "LSTM", "GRU"]
    if config.model in ("gpt", "mha_gpt"):
        types.append("Embedding")
    bias = "zeros" if config.bias is None else config.bias
    if config.init is not None:
        weights = r"^weight$|weight_ih|in_proj" if config.model in RECURRENT else None
        callbacks.append(WeightInit(config.init, types=types, weights=weights, bias=bias, seed=config.seed,
                                    verbose=False))
    elif config.bias is not None:
        callbacks.append(WeightInit("default", types=types, bias=bias, seed=config.seed, verbose=False))
    if config.init_recurrent is not None:
        callbacks.append(WeightInit(config.init_recurrent, types=list(RECURRENT.values()), weights="weight_hh",
                                    bias="keep", seed=config.seed + 1, verbose=False))
    return callbacks


def _verdict(trainer: Trainer) -> Any:
    """``gradmon.verdict(trainer)`` where the library has it, else the ActivationMonitor's first finding."""
    verdict = getattr(gradmon, "verdict", None)
    if verdict is not None:
        return verdict(trainer)
    for callback in trainer.callbacks:
        if isinstance(callback, ActivationMonitor) and callback.found:
            return next(iter(callback.found.values()))
    return None


def run(config: RunConfig, callbacks: list | None = None, log_every_n_steps: int = 5) -> RunResult:
    """Train ``config`` on one CPU thread and report what happened.

    Args:
        config: the run.
        callbacks: the monitors to attach (after the WeightInit callbacks the config implies); by default a
            ``GradHealthMonitor`` and an ``ActivationMonitor`` observing every ``log_every_n_steps`` steps.
        log_every_n_steps: the Trainer's (and the default ActivationMonitor's) logging interval.

    Returns:
        The run's :class:`RunResult`.
    """
    torch.set_num_threads(1)
    seed_everything(config.seed, verbose=False)
    if callbacks is None:
        callbacks = [GradHealthMonitor(), ActivationMonitor(log_every_n_steps=log_every_n_steps)]
    module = ZooModule(config)
    data = dataset(config)
    loader = DataLoader(data, batch_size=LM_BATCH if config.model in LANGUAGE_MODELS else BATCH, shuffle=True,
                        drop_last=True, generator=seeded_generator(config.seed))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=config.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=config.clip,
        precision=config.precision,
        log_every_n_steps=log_every_n_steps,
        callbacks=[*init_callbacks(config), *callbacks],
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, lightning_quiet():
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    losses = module.losses
    health = [c for c in trainer.callbacks if isinstance(c, GradHealthMonitor)]
    flagged = dict(health[0].flagged_steps) if health else {}
    monitors = [c for c in trainer.callbacks if isinstance(c, ActivationMonitor)]
    first = _mean(losses[:5])
    last = _mean(losses[-5:])
    finite = all(math.isfinite(loss) for loss in losses)
    return RunResult(
        config=config,
        losses=losses,
        first_loss=first,
        last_loss=last,
        trained=finite and last < TRAINED_FRACTION * min(first, chance_loss(config)) and not any(flagged.values()),
        flagged=flagged,
        warnings=[str(w.message) for w in caught if issubclass(w.category, GradientHealthWarning)],
        findings=list(monitors[0].found.values()) if monitors else [],
        verdict=_verdict(trainer),
        trainer=trainer,
        seconds=seconds,
    )


def chance_loss(config: RunConfig) -> float:
    """The cross-entropy of a uniform guess: ln(classes), or ln(vocabulary) for a language model."""
    return math.log(VOCAB if config.model in LANGUAGE_MODELS else CLASSES)


def _mean(values: list[float]) -> float:
    if not values or not all(math.isfinite(v) for v in values):
        return math.nan
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------------------


def _gelu_std(width: int) -> float:
    """The std that keeps a GELU net's signal: ``needed_gain(GELU) / sqrt(fan_in)``, rounded."""
    return round(needed_gain(nn.GELU()) / math.sqrt(width), 4)


def _cases() -> list[Case]:
    relu_mlp = RunConfig("mlp", depth=10, init=KAIMING, lr=0.05)
    gelu_mlp = RunConfig("mlp", activation="gelu", depth=10, init=f"normal(std={_gelu_std(64)})", lr=0.02)
    tanh_mlp = RunConfig("mlp", activation="tanh", depth=8, init="xavier_normal(gain=1.667)", lr=0.02)
    conv = RunConfig("conv", depth=10, width=16, init=KAIMING, optimizer="sgd_momentum", lr=0.01, steps=100)
    gpt = RunConfig("gpt", activation="gelu", depth=2, width=64, init="normal(std=0.02)", optimizer="adamw",
                    lr=3e-3)
    post_ln = replace(gpt, depth=4, post_ln=True, optimizer="adam", lr=2e-2, warmup_steps=30, steps=80)
    rnn = RunConfig("rnn", activation="tanh", depth=1, width=64, init_recurrent="orthogonal", optimizer="adam",
                    lr=3e-3)
    cases: list[Case] = []

    def sick(name: str, twin: str, expected: str, fix: dict[str, Any], note: str, **faults: Any) -> None:
        base = next(c.config for c in cases if c.name == twin)
        cases.append(Case(name, replace(base, **faults), expected, twin, fix, note))

    def healthy(name: str, config: RunConfig, note: str) -> None:
        cases.append(Case(name, config, None, None, {}, note))

    # Healthy twins first: the sick cases are built from them.
    healthy("healthy/relu_mlp_kaiming", relu_mlp, "10-layer ReLU MLP, kaiming, SGD")
    healthy("healthy/gelu_mlp", gelu_mlp, "10-layer GELU MLP, N(0, 1.53/sqrt(64)), SGD")
    healthy("healthy/tanh_mlp_xavier", tanh_mlp, "8-layer tanh MLP, xavier gain 5/3, SGD")
    healthy("healthy/conv_kaiming", conv, "10-layer plain conv net (no BN), kaiming, SGD momentum")
    healthy("healthy/gpt", gpt, "2-block pre-LN GPT, nanoGPT init N(0, 0.02), AdamW 3e-3")
    healthy("healthy/gpt_postln_warmup", post_ln, "4-block post-LN GPT, Adam 2e-2 with 30 warm-up steps")
    healthy("healthy/rnn_orthogonal", rnn, "tanh RNN LM, orthogonal recurrent weights, Adam")
    healthy("healthy/mlp_sgd_momentum", replace(relu_mlp, depth=4, optimizer="sgd_momentum", lr=0.02),
            "4-layer ReLU MLP, kaiming, SGD momentum 0.9")
    healthy("healthy/mlp_guarded_log", RunConfig("mlp", depth=3, init=KAIMING, bad_op="log", guard=True,
                                                  optimizer="adam", lr=3e-3, steps=100),
            "3-layer MLP with a cosine head (logits +-300), 10% label noise, log_softmax loss")
    healthy("healthy/mlp_guarded_div", RunConfig("mlp", depth=3, init=KAIMING, bad_op="div", guard=True,
                                                 optimizer="adam", lr=1e-3),
            "3-layer MLP normalising its input with eps; zero-padded rows in the data")

    # Sick cases.
    sick("init_too_small/relu_mlp", "healthy/relu_mlp_kaiming", "init_too_small", {"init": KAIMING},
         "10-layer ReLU MLP, N(0, 0.01): the signal vanishes (0.11x per layer)", init="normal(std=0.01)")
    sick("init_too_small/gelu_mlp", "healthy/gelu_mlp", "init_too_small", {"init": gelu_mlp.init},
         "10-layer GELU MLP, N(0, 0.01)", init="normal(std=0.01)")
    sick("init_too_small/conv_default", "healthy/conv_kaiming", "init_too_small", {"init": KAIMING},
         "10-layer plain conv net with PyTorch's default init (0.41x kaiming per layer)", init=None)
    sick("init_too_large/relu_mlp", "healthy/relu_mlp_kaiming", "init_too_large", {"init": KAIMING},
         "10-layer ReLU MLP, N(0, 1): the signal explodes (5.7x per layer)", init="normal(std=1.0)")
    sick("init_too_large/tanh_mlp", "healthy/tanh_mlp_xavier", "init_too_large", {"init": tanh_mlp.init},
         "8-layer tanh MLP, N(0, 1): every tanh saturates", init="normal(std=1.0)")
    cases.append(Case("gain_mismatch/relu_mlp_xavier", replace(relu_mlp, depth=16, init="xavier_normal"),
                      "gain_mismatch", "healthy/relu_mlp16_kaiming", {"init": KAIMING},
                      "16-layer ReLU MLP, xavier: the signal shrinks 0.71x per layer"))
    healthy("healthy/relu_mlp16_kaiming", replace(relu_mlp, depth=16), "16-layer ReLU MLP, kaiming, SGD")
    cases.append(Case("saturating_activation/sigmoid_mlp",
                      RunConfig("mlp", activation="sigmoid", depth=10, init="xavier_normal", lr=0.02),
                      "saturating_activation", "healthy/relu_mlp_kaiming",
                      {"activation": "relu", "init": KAIMING},
                      "10-layer sigmoid MLP, xavier: the gradient shrinks 4x per layer"))
    sick("dead_relu/negative_bias", "healthy/relu_mlp_kaiming", "dead_relu", {"bias": 0.0},
         "10-layer ReLU MLP, kaiming, biases -1: most units dead", bias=-1.0)
    sick("lr_too_high/mlp_sgd", "healthy/mlp_sgd_momentum", "lr_too_high", {"lr": 0.02},
         "4-layer ReLU MLP, SGD momentum at lr 2: diverges", lr=2.0)
    sick("lr_too_high/gpt_adamw", "healthy/gpt", "lr_too_high", {"lr": 3e-3},
         "2-block GPT, AdamW at lr 1: the loss rises and stays up", lr=1.0)
    sick("lr_too_high/dead_relu_sgd", "healthy/relu_mlp_kaiming", "lr_too_high", {"lr": 0.05},
         "10-layer ReLU MLP, SGD at lr 1: large updates kill the ReLUs", lr=1.0)
    sick("no_warmup/gpt_postln", "healthy/gpt_postln_warmup", "no_warmup", {"warmup_steps": 30},
         "4-block post-LN GPT, Adam 2e-2 without warm-up: collapses to the unigram loss", warmup_steps=0)
    sick("init_too_large/rnn_recurrent", "healthy/rnn_orthogonal", "init_too_large",
         {"init_recurrent": "orthogonal"}, "tanh RNN LM, recurrent N(0, 0.5): gradients explode through time",
         init_recurrent="normal(std=0.5)")
    sick("bad_op/log_softmax", "healthy/mlp_guarded_log", "bad_op", {"guard": True},
         "nll(log(softmax(z))) with logits +-300: log(0) = -inf, then NaN", guard=False)
    sick("bad_op/div_norm", "healthy/mlp_guarded_div", "bad_op", {"guard": True},
         "x / x.norm() without eps on zero-padded rows: 0/0 = NaN", guard=False)
    sick("lr_too_low/mlp_sgd", "healthy/mlp_sgd_momentum", "lr_too_low", {"lr": 0.02},
         "4-layer ReLU MLP, SGD momentum at lr 2e-4: the loss barely moves", lr=2e-4)

    # Healthy runs of their own.
    healthy("healthy/gpt_tied", replace(gpt, tied=True), "2-block pre-LN GPT with tied embeddings")
    healthy("healthy/mha_gpt", replace(gpt, model="mha_gpt"), "2-block pre-LN decoder on nn.MultiheadAttention")
    healthy("healthy/gpt_bf16", replace(gpt, precision="bf16-mixed"), "2-block pre-LN GPT under bf16-mixed")
    healthy("healthy/resnet_bn", RunConfig("resnet", depth=3, width=16, init=KAIMING, optimizer="sgd_momentum",
                                           lr=0.05), "3-block residual conv net with BatchNorm, SGD momentum")
    healthy("healthy/conv_bn", replace(conv, norm="batchnorm", init=None, lr=0.05),
            "10-layer conv net with BatchNorm, default init, SGD momentum")
    healthy("healthy/lstm_clip", RunConfig("lstm", depth=1, width=64, optimizer="adam", lr=1e-2, clip=1.0),
            "LSTM LM, Adam 1e-2, gradient clipping 1.0")
    healthy("healthy/gru", RunConfig("gru", depth=1, width=64, optimizer="adam", lr=1e-2), "GRU LM, Adam 1e-2")
    healthy("healthy/mlp3_adam", RunConfig("mlp", depth=3, optimizer="adam", lr=1e-2),
            "3-layer ReLU MLP, default init, Adam 1e-2")
    healthy("healthy/silu_mlp", RunConfig("mlp", activation="silu", depth=8, init="kaiming_normal", lr=0.05),
            "8-layer SiLU MLP, kaiming (gain sqrt 2 ~ SiLU's 1.68), SGD")
    healthy("healthy/mlp_layernorm", RunConfig("mlp", depth=8, norm="layernorm", optimizer="adam", lr=1e-3),
            "8-layer ReLU MLP with LayerNorm, default init, Adam")
    healthy("healthy/gelu_mlp_layernorm", RunConfig("mlp", activation="gelu", depth=8, norm="layernorm",
                                                    optimizer="adamw", lr=1e-3),
            "8-layer GELU MLP with LayerNorm, AdamW")
    healthy("healthy/mlp_batchnorm", RunConfig("mlp", depth=8, norm="batchnorm", lr=0.05),
            "8-layer ReLU MLP with BatchNorm, default init, SGD")
    healthy("healthy/mlp_bf16", replace(relu_mlp, depth=4, optimizer="adam", lr=1e-3, precision="bf16-mixed"),
            "4-layer ReLU MLP under bf16-mixed, Adam")
    sick("lr_too_high/mlp_adam", "healthy/mlp3_adam", "lr_too_high", {"lr": 1e-2},
         "3-layer ReLU MLP, Adam at lr 3", lr=3.0)

    # Held out: added after the rules were written, to check them on runs they were not tuned on.
    healthy("healthy/mlp_sgd_plain", replace(relu_mlp, depth=4, lr=0.05), "4-layer ReLU MLP, kaiming, plain SGD")
    sick("lr_too_high/mlp_sgd_nan", "healthy/mlp_sgd_plain", "lr_too_high", {"lr": 0.05},
         "4-layer ReLU MLP, plain SGD at lr 50: NaN within a few steps", lr=50.0)
    sick("init_too_small/tanh_mlp", "healthy/tanh_mlp_xavier", "init_too_small", {"init": tanh_mlp.init},
         "8-layer tanh MLP, N(0, 0.01): the signal vanishes", init="normal(std=0.01)")
    sick("init_too_small/gelu_mlp_bf16", "healthy/gelu_mlp", "init_too_small", {"init": gelu_mlp.init},
         "10-layer GELU MLP, N(0, 0.01), bf16-mixed", init="normal(std=0.01)", precision="bf16-mixed")
    sick("dead_relu/conv_negative_bias", "healthy/conv_kaiming", "dead_relu", {"bias": 0.0},
         "10-layer conv net, kaiming, biases -1: most channels dead", bias=-1.0)
    sick("lr_too_low/gpt_adamw", "healthy/gpt", "lr_too_low", {"lr": 3e-3},
         "2-block GPT, AdamW at lr 1e-6: the loss barely moves", lr=1e-6)
    sick("lr_too_high/mha_gpt_adamw", "healthy/mha_gpt", "lr_too_high", {"lr": 3e-3},
         "2-block decoder on nn.MultiheadAttention, AdamW at lr 1", lr=1.0)
    healthy("healthy/gpt_postln_low_lr", replace(post_ln, lr=3e-3, warmup_steps=0),
            "4-block post-LN GPT, Adam 3e-3 without warm-up")
    return cases


CASES: list[Case] = _cases()


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------


def _loss(value: float) -> str:
    return f"{value:7.3f}" if math.isfinite(value) else "    nan"


def main(argv: list[str] | None = None) -> None:
    """Run the zoo (or the named cases) and each sick case's fix, and print one row per case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="case names or prefixes (default: all)")
    parser.add_argument("--no-fix", action="store_true", help="skip the sick cases' fixed runs")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.names or any(c.name.startswith(n) for n in args.names)]
    header = (f"{'case':38} {'expected':22} {'trained':7} {'fix':5} {'first':>7} {'last':>7} {'fix last':>8} "
              f"{'sec':>5} {'warn':>4}  flags / found")
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    problems: list[str] = []
    for case in cases:
        result = run(case.config)
        fixed = run(replace(case.config, **case.fix)) if case.fix and not args.no_fix else None
        seconds = result.seconds + (fixed.seconds if fixed else 0.0)
        flags = ",".join(f"{k}:{v}" for k, v in result.flagged.items() if v)
        found = ",".join(result.found) or "-"
        print(f"{case.name:38} {case.expected or '-':22} {str(result.trained):7} "
              f"{'-' if fixed is None else str(fixed.trained):5} {_loss(result.first_loss)} "
              f"{_loss(result.last_loss)} {_loss(fixed.last_loss) if fixed else '      -':>8} {seconds:5.1f} "
              f"{len(result.warnings):4}  {flags or '-'} / {found}", flush=True)
        if (case.expected is None) != result.trained:
            problems.append(f"{case.name}: trained={result.trained}")
        if fixed is not None and not fixed.trained:
            problems.append(f"{case.name}: fix did not train (flags {fixed.flagged})")
    print(f"\n{len(cases)} cases in {time.perf_counter() - start:.0f} s")
    for problem in problems:
        print("PROBLEM", problem)


if __name__ == "__main__":
    main()
