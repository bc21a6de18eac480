"""Overhead benchmark: what gradmon's monitors cost per training step, against no monitoring and against Lightning's
documented ``grad_norm`` recipe.

    python -m experiments.benchmark [--repeats 7] [--device cpu|cuda] [--threads 1]

Trains, in one process, interleaved and repeated (median of the repeats), a 20x64 and a 4x512 ReLU MLP (kaiming
init, so the healthy path is timed; batch 128, CPU) four ways:

  (a) ``none``: no callbacks;
  (b) ``gradmon``: GradNormMonitor + GradHealthMonitor, computing every step and logging every 50;
  (c) ``recipe``: ``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``, logging every 50;
  (f) ``floor``, a reference: one callback that does nothing but ``torch._foreach_norm`` over the gradients (of a
      parameter list taken once) in ``on_before_optimizer_step``: what reading the gradients once at that hook costs.

and (b) with an ActivationMonitor logging every 50 steps as well; on the CPU also (m), a bound rather than a
variant: :class:`MinimalHealthCheck`, the least a health check written in Python does per step (the floor, its norms
read as floats, combined into layers and put through the health rules' arithmetic in C-level maps, nothing else),
printed with (b)'s in-hook time split into its median step that does not log, its logging steps and the spread of
the others. All log to TensorBoard with ``log_every_n_steps=50``. Step times are taken between callback hooks after
a warm-up, so Trainer start-up is excluded. Prints ms/step, the ratios (b)/(a), (c)/(b), (f)/(a) and (b)/(f), and
the time spent inside the callbacks' own hooks per step for (b) and (f) (median over the runs; far steadier than a
difference of two end-to-end times), the same time as a share of each run's own step (:func:`same_run_share`:
steadier still, as the machine's speed moves both numbers of one run alike), ActivationMonitor's own hook time on
the steps that do not log and on those that do, then the targets and whether each is met, the in-hook breakdown
(:mod:`experiments.profile_hooks`), and the cost of one GradCheck relative to one training step. On ``--device
cuda`` a large MLP (8x4096) joins, where the GPU rather than Python is the bottleneck, and (b) runs a second time
with ``GradHealthMonitor(sync_free=True)``: on a GPU the default mode's in-hook time includes waiting for the device
(its host read of the norms), the sync-free mode's is host work alone.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import statistics
import tempfile
import warnings
from itertools import repeat
from operator import add, le, mul

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import grad_norm

from experiments import benchmark_gradcheck, profile_hooks
from experiments.timing import BATCH, IN_FEATURES, NUM_CLASSES, WARMUP_STEPS, BenchMLP, HookClock, StepTimer
from gradmon import ActivationMonitor, GradHealthMonitor, GradNormMonitor
from gradmon.health import HealthRules

#: The variants, in the order of the printed table's columns (a), (b), (c) and (f).
VARIANTS = ("none", "gradmon", "recipe", "floor")
#: Also timed, with its own in-hook column: (b) plus ActivationMonitor logging every 50 steps.
ACTIVATIONS = "gradmon+activations"
#: Also timed on the CPU, with its own in-hook column: (m), the least a health check in Python can do per step.
MINIMAL = "minimal"
#: On ``--device cuda`` only: (b) with ``GradHealthMonitor(sync_free=True)``, whose hooks never wait for the device
#: (the default mode reads each step's norms on the host, so its in-hook time includes waiting for the backward).
SYNC_FREE = "gradmon-sync-free"
#: How the printout names the variants whose hooks are timed.
LABELS = {
    "gradmon": "(b)", "floor": "(f)", MINIMAL: "(m)", ACTIVATIONS: "(b)+ActivationMonitor", SYNC_FREE: "(b) sync-free",
}


class RecipeMLP(BenchMLP):
    """Lightning's documented per-layer gradient-norm recipe."""

    def on_before_optimizer_step(self, optimizer):
        self.log_dict(grad_norm(self, norm_type=2))


class NormFloor(pl.Callback):
    """Reads every gradient once per step and nothing else: what gradmon cannot go below at its hook."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.params = list(pl_module.parameters())  # once, as gradmon builds its layout once

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        torch._foreach_norm([p.grad for p in self.params], 2.0)


class MinimalHealthCheck(pl.Callback):
    """A bound, not a monitor: the least work a health check written in Python does at a healthy step, with nothing
    around it. The floor's kernel; its norms read as Python floats; each layer's norm (a weight and a bias: one
    ``hypot``); then the default :class:`~gradmon.HealthRules` on them: the thresholds, the spike test against each
    layer's running mean of log norms and the update of that mean, the depth test; every part in one C-level call over
    the layers (no Python frame per layer), in one hook, with no step counting, no layout check, no missing-gradient
    scan, no events, no logging. A step that is not plainly healthy is counted in ``unhealthy`` and not judged further,
    so the bound never costs more than the real thing. Its running means are :class:`~gradmon.health.HealthTracker`'s
    bit for bit (a test holds it to that), so it does the same arithmetic."""

    def __init__(self) -> None:
        rules = HealthRules()
        self.low, self.high, self.decay = rules.vanishing_threshold, rules.exploding_threshold, rules.history_decay
        self.keep = 1.0 - rules.history_decay
        self.spike = math.log(rules.spike_factor) if rules.spike_factor is not None else math.inf
        self.judged_from = max(rules.warmup_steps, 1)
        log_ratio = math.log(rules.depth_ratio) if rules.depth_ratio is not None else -math.inf
        self.depth = (rules.depth_window, log_ratio, rules.depth_min_layers)
        self.means: list[float] | None = None
        self.seen = self.unhealthy = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.params = list(pl_module.parameters())  # (weight, bias) pairs, once

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        values = list(map(torch.Tensor.item, torch._foreach_norm([p.grad for p in self.params], 2.0)))
        layers = list(map(math.hypot, values[0::2], values[1::2]))
        # A finite total means no NaN or inf among the layers (the real rules then look closer).
        if not (math.hypot(*layers) < math.inf and min(layers) >= self.low and max(layers) <= self.high):
            self.unhealthy += 1
            return
        logs = list(map(math.log, layers))  # every layer >= vanishing_threshold > 0
        means = self.means
        if means is not None and self.seen >= self.judged_from and not all(
            map(le, logs, map(add, means, repeat(self.spike)))
        ):
            self.unhealthy += 1
            return
        k, log_ratio, min_layers = self.depth
        if len(logs) >= min_layers and sum(logs[:k]) / k < sum(logs[-k:]) / k + log_ratio:
            self.unhealthy += 1
            return
        self.means = logs if means is None else list(map(add, map(mul, repeat(self.decay), means),
                                                             map(mul, repeat(self.keep), logs)))
        self.seen += 1


LAST_TIMER: list[StepTimer] = [StepTimer()]
#: The last run's :class:`HookClock` (of (b)'s callbacks, or of the floor's or (m)'s).
LAST_CLOCK: list[HookClock] = [HookClock()]
#: ActivationMonitor's own hook times in the last run that had one.
LAST_ACTIVATION_CLOCK: list[HookClock | None] = [None]


def run(variant: str, depth: int, width: int, steps: int, logdir: str, device: str) -> tuple[float, float]:
    """(ms per step, microseconds per step inside gradmon's hooks) of one training run; the run's :class:`StepTimer`
    is kept in :data:`LAST_TIMER` for per-step medians."""
    torch.manual_seed(0)
    model = (RecipeMLP if variant == "recipe" else BenchMLP)(depth, width)
    timer, clock = StepTimer(), HookClock()
    callbacks: list[pl.Callback] = [timer]
    if variant in ("gradmon", ACTIVATIONS, SYNC_FREE):
        health = GradHealthMonitor(sync_free=variant == SYNC_FREE)
        callbacks = [clock.wrap(GradNormMonitor(log_every_n_steps=50)), clock.wrap(health), timer]
        if variant == ACTIVATIONS:
            own = LAST_ACTIVATION_CLOCK[0] = HookClock()  # its own hooks, timed apart as well
            callbacks.insert(0, clock.wrap(own.wrap(ActivationMonitor(log_every_n_steps=50))))
    elif variant == "floor":
        callbacks = [clock.wrap(NormFloor()), timer]
    elif variant == MINIMAL:
        callbacks = [clock.wrap(MinimalHealthCheck()), timer]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * steps, IN_FEATURES, generator=g)
    y = torch.randint(0, NUM_CLASSES, (BATCH * steps,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps, callbacks=callbacks,
        log_every_n_steps=50, logger=pl.loggers.TensorBoardLogger(logdir, name=variant), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(model, loader)
    LAST_TIMER[0] = timer
    LAST_CLOCK[0] = clock
    measured = steps - WARMUP_STEPS
    return 1e3 * (timer.end - timer.start) / measured, 1e6 * clock.seconds / measured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="runs of each variant (median taken); at least 5")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default: cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (default: 1)")
    parser.add_argument("--no-gradcheck", action="store_true", help="skip the GradCheck cost table")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    models = {"20x64": (20, 64, 400), "4x512": (4, 512, 150)}
    if args.device == "cuda":  # large enough that the GPU, not Python, is the bottleneck
        models["8x4096"] = (8, 4096, 150)
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {where}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"lightning {pl.__version__}")
    print(f"{'model':<8}{'(a) none':>12}{'(b) gradmon':>14}{'(c) recipe':>13}{'(f) floor':>12}"
          f"{'(b)/(a)':>10}{'(c)/(b)':>10}{'(f)/(a)':>10}{'(b)/(f)':>10}{'in-hook (b)':>14}{'% of (a)':>10}"
          f"{'in-hook (f)':>14}")
    results = {}
    steady: dict[str, dict[str, float]] = {}
    activations_rows: list[tuple[str, float, float, float, float, float, float]] = []
    split_rows: list[tuple[str, dict[bool, float], dict[bool, float]]] = []
    sync_free_rows: list[tuple[str, float, float, float, float]] = []
    # The minimal health check reads each norm with .item(): on a GPU that is a sync per norm, no bound of anything.
    extra = (ACTIVATIONS, SYNC_FREE) if args.device == "cuda" else (ACTIVATIONS, MINIMAL)
    bound_rows: list[tuple[str, float, float, float, float, float]] = []
    with tempfile.TemporaryDirectory() as logdir:
        for name, (depth, width, steps) in models.items():
            times: dict[str, list[float]] = {variant: [] for variant in (*VARIANTS, *extra)}
            hook_us: dict[str, list[float]] = {"gradmon": [], "floor": [], **{v: [] for v in extra}}
            step_ms: dict[str, dict[bool, list[float]]] = {v: {True: [], False: []} for v in ("gradmon", ACTIVATIONS)}
            own_us: dict[bool, list[float]] = {True: [], False: []}  # ActivationMonitor's own hooks, per step
            # Each run's in-hook time as a share of that run's own step less the hook time: the machine's speed
            # drifts between runs (and moves both numbers alike within one), so this ratio is far steadier.
            own_share: dict[str, list[float]] = {v: [] for v in hook_us}
            median_step_us: list[float] = []  # (b)'s in-hook median over the steps that do not log
            logging_steps_us: list[float] = []  # (b)'s logging steps (and the step after each) beyond that, per step
            for _ in range(max(args.repeats, 5)):
                for variant in times:  # interleaved, so drifts in machine load hit all variants alike
                    ms, us = run(variant, depth, width, steps, logdir, args.device)
                    times[variant].append(ms)
                    if variant in hook_us:
                        hook_us[variant].append(us)
                        own_share[variant].append(same_run_share(us, ms))
                    if variant == "gradmon":
                        median_step, logging_steps = LAST_CLOCK[0].split_us()
                        median_step_us.append(median_step)
                        logging_steps_us.append(logging_steps)
                    if variant in step_ms:
                        for logging_step in (True, False):
                            step_ms[variant][logging_step].append(LAST_TIMER[0].median_ms(logging_step))
                    own = LAST_ACTIVATION_CLOCK[0]
                    if variant == ACTIVATIONS and own is not None:
                        for logging_step in (True, False):
                            own_us[logging_step].append(own.median_us(logging_step))
            none, gradmon, recipe, floor = (statistics.median(times[v]) for v in VARIANTS)
            in_hook, floor_hook = statistics.median(hook_us["gradmon"]), statistics.median(hook_us["floor"])
            with_activations = statistics.median(times[ACTIVATIONS]), statistics.median(hook_us[ACTIVATIONS])
            minimal_hook = statistics.median(hook_us[MINIMAL]) if MINIMAL in hook_us else math.nan
            results[name] = (none, gradmon, recipe, floor, in_hook, floor_hook, minimal_hook)
            steady[name] = {v: statistics.median(x) for v, x in own_share.items()}
            bound_rows.append((name, none, minimal_hook, in_hook, statistics.median(median_step_us),
                               statistics.median(logging_steps_us)))
            activations_rows.append((name, none, *with_activations, in_hook, statistics.median(own_us[False]),
                                     statistics.median(own_us[True])))
            medians = {v: {k: statistics.median(x) for k, x in d.items()} for v, d in step_ms.items()}
            split_rows.append((name, medians["gradmon"], medians[ACTIVATIONS]))
            if SYNC_FREE in times:
                sync_free_rows.append((name, none, gradmon, statistics.median(times[SYNC_FREE]),
                                       statistics.median(hook_us[SYNC_FREE])))
            times_ms = f"{none:>10.3f}ms{gradmon:>12.3f}ms{recipe:>11.3f}ms{floor:>10.3f}ms"
            ratios = f"{gradmon / none:>10.3f}{recipe / gradmon:>10.2f}{floor / none:>10.3f}{gradmon / floor:>10.3f}"
            print(f"{name:<8}{times_ms}{ratios}{in_hook:>12.0f}us{100 * in_hook / (1e3 * none):>9.1f}%"
                  f"{floor_hook:>12.0f}us", flush=True)
    print("\nin-hook time as a share of the same run's step without it (each run's own ratio, median over the runs; "
          "steadier than the share of (a) above, which divides numbers from different runs):")
    for name, shares in steady.items():
        print(f"{name:<8}" + "  ".join(f"{LABELS.get(v, v)} {share:.2f}%" for v, share in shares.items()))
    if MINIMAL in extra:
        print("\n(m) the least a health check in Python does per step (MinimalHealthCheck: a bound, not a monitor); "
              "(b)'s in-hook mean split into its median step that does not log, its logging steps (amortised) and "
              "the spread of the other steps about their median:")
        for name, none, minimal_us, gradmon_us, median_step, logged in bound_rows:
            spread = gradmon_us - median_step - logged
            print(f"{name:<8}(m) {_share(minimal_us, none)}; (b) {_share(gradmon_us, none)} = median step "
                  f"{_share(median_step, none)} + logging {_share(logged, none)} + spread {_share(spread, none)}")
    print("\nwith ActivationMonitor (logging every 50) beside (b):")
    for name, none, ms, us, gradmon_us, quiet_us, logging_us in activations_rows:
        print(f"{name:<8}{ms:>10.3f}ms  ratio to (a) {ms / none:.3f}  in-hook {us:.0f}us "
              f"(+{us - gradmon_us:.0f}us over (b)); ActivationMonitor's own hooks: {quiet_us:.1f}us on a step that "
              f"does not log ({100 * quiet_us / (1e3 * none):.2f}% of (a)), {logging_us / 1e3:.2f}ms on a logging step")
    print("median step, (b) -> with ActivationMonitor: steps that do not log | logging steps (end to end, noisy)")
    for name, gradmon_ms, activations_ms in split_rows:
        print(f"{name:<8}{gradmon_ms[False]:>8.3f} -> {activations_ms[False]:.3f} ms | "
              f"{gradmon_ms[True]:.3f} -> {activations_ms[True]:.3f} ms")
    if sync_free_rows:
        print("\n(b) with GradHealthMonitor(sync_free=True): no hook waits for the device")
        for name, none, gradmon, ms, us in sync_free_rows:
            print(f"{name:<8}{ms:>10.3f}ms  ratio to (a) {ms / none:.3f} (default mode {gradmon / none:.3f})  "
                  f"in-hook {us:.0f}us ({100 * us / (1e3 * none):.1f}% of (a))")
    print_targets(results, steady)
    if args.device == "cpu":
        parts = profile_hooks.profile()
        print("\nwhere the 20x64 in-hook time goes (us per step): " + ", ".join(
            f"{name} {parts.get(name, 0.0):.0f}" for name in ("kernel", "transfer", "rules", "bookkeeping", "total")))
    if not args.no_gradcheck and args.device == "cpu":
        print()
        benchmark_gradcheck.main(threads=torch.get_num_threads())


def same_run_share(hook_us: float, step_ms: float) -> float:
    """The time inside the hooks (``hook_us`` per step) as a percentage of the same run's step without it (``step_ms``
    per step, hooks included, less the hooks): both numbers come from one run, so the machine's speed, which drifts
    between runs by far more than gradmon costs, moves them alike and the ratio stays put. It slightly understates the
    share of a step of (a): Lightning's own dispatch of the callbacks' hooks stays in the denominator."""
    return 100 * hook_us / (1e3 * step_ms - hook_us)


def _share(us: float, step_ms: float) -> str:
    """``us`` microseconds and their share of a step of ``step_ms`` milliseconds."""
    return f"{us:.0f}us ({100 * us / (1e3 * step_ms):.1f}%)"


def print_targets(results: dict[str, tuple[float, float, float, float, float, float, float]],
                  steady: dict[str, dict[str, float]] | None = None) -> None:
    """The targets, each with the measured value and whether it is met; ``steady`` (:func:`same_run_share` per model
    and variant) adds each run's own reading beside the two in-hook targets (20x64's share, 4x512's beyond the
    floor)."""
    checks = []
    if "20x64" in results:
        none, gradmon, recipe, _, in_hook, floor_hook, minimal_hook = results["20x64"]
        bound = "" if math.isnan(minimal_hook) else f"; (m)'s: {100 * minimal_hook / (1e3 * none):.1f}%"
        same_run = (steady or {}).get("20x64", {})
        if "gradmon" in same_run:
            bound += f"; within each run: (b) {same_run['gradmon']:.2f}%" + "".join(
                f", {LABELS[v]} {same_run[v]:.2f}%" for v in ("floor", MINIMAL) if v in same_run)
        checks += [
            (f"20x64 in-hook cost <= 5% of a step without monitoring (the floor's own: "
             f"{100 * floor_hook / (1e3 * none):.1f}%{bound})", 100 * in_hook / (1e3 * none), 5.0, "%"),
            ("20x64 (b)/(a) <= 1.08", gradmon / none, 1.08, ""),
            ("20x64 (c)/(b) >= 3 (the recipe costs 3x more)", -recipe / gradmon, -3.0, ""),
        ]
    if "4x512" in results:
        none, gradmon, _, floor, in_hook, floor_hook, _ = results["4x512"]
        same_run = (steady or {}).get("4x512", {})
        within = (f" (within each run: {same_run['gradmon'] - same_run['floor']:.2f}%)"
                  if "gradmon" in same_run and "floor" in same_run else "")
        checks += [
            ("4x512 (b) within 2% of the floor (f), end to end", gradmon / floor, 1.02, ""),
            # The steady measure of the same: what gradmon's hooks spend beyond the floor's, per step of (a).
            (f"4x512 in-hook (b) - in-hook (f) <= 2% of a step without monitoring{within}",
             100 * (in_hook - floor_hook) / (1e3 * none), 2.0, "%"),
        ]
    print()
    for text, value, bound, unit in checks:
        shown = -value if value < 0 else value
        print(f"  {'met    ' if value <= bound else 'NOT met'}  {text}: {shown:.3f}{unit}")


if __name__ == "__main__":
    main()
