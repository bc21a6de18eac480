""""Every n steps" means the same in every callback: optimizer steps, counted per optimizer (an optimizer's steps 0,
n, 2n, ...); callbacks that look at a whole batch (ActivationMonitor, GradCheck) count the first optimizer's steps.
Read back from what the callbacks log."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from helpers import GAN, MLP, fit, gan_loader, health_warnings, logdir, read_scalars

from gradmon import ActivationMonitor, GradCheck, GradHealthMonitor, GradNormMonitor, HealthRules

NORM, HEALTH, ACTIVATION, CHECK = "grad_norm/total", "grad_health/vanishing", "activation_rms/net.0", (
    "gradcheck/max_rel_error")
#: The generator's and the discriminator's totals (named as Lightning's LearningRateMonitor names them).
GENERATOR, DISCRIMINATOR = "grad_norm/total-Adam", "grad_norm/total-Adam-1"


def four(n: int) -> list:
    return [GradNormMonitor(log_every_n_steps=n, images_every_n_logs=None), GradHealthMonitor(log_every_n_steps=n),
            ActivationMonitor(log_every_n_steps=n, summary=False),
            GradCheck(every_n_steps=n, num_samples=2, num_directions=1)]


def logged(path: Path, *tags: str) -> dict[str, list[int]]:
    """The steps (``trainer.global_step``) each tag was logged at."""
    scalars = read_scalars(logdir(path))
    return {tag: sorted(scalars.get(tag, {})) for tag in tags}


def quiet_fit(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(*args, **kwargs)


def test_with_one_optimizer_the_four_callbacks_are_due_at_the_same_steps(tmp_path: Path) -> None:
    quiet_fit(MLP(depth=2), four(3), steps=8, tmp_path=tmp_path)
    steps = logged(tmp_path, NORM, HEALTH, ACTIVATION, CHECK)
    assert steps[NORM] == steps[HEALTH] == steps[ACTIVATION] == [0, 3, 6]
    assert steps[CHECK] == [1, 3, 6]  # positive multiples, and once after burn_in_steps=1 (check_at_start)


def test_under_gradient_accumulation_every_n_counts_optimizer_steps_not_batches(tmp_path: Path) -> None:
    quiet_fit(MLP(depth=2), four(2), steps=5, batches=10, tmp_path=tmp_path, accumulate_grad_batches=2)
    steps = logged(tmp_path, NORM, HEALTH, ACTIVATION, CHECK)
    assert steps[NORM] == steps[HEALTH] == steps[ACTIVATION] == [0, 2, 4]
    assert steps[CHECK] == [1, 2, 4]  # once per optimizer step, not once per micro-batch


def gan_monitors(n: int) -> list:
    return four(n)[:3]  # GradCheck needs automatic optimization, hence one optimizer


def test_with_two_optimizers_each_counts_its_own_steps_and_batch_callbacks_count_the_first(tmp_path: Path) -> None:
    # Each batch steps the generator (global steps 0, 2, 4, ...) then the discriminator (1, 3, 5, ...): their
    # steps 0, 2, 4 are global steps 0, 4, 8 and 1, 5, 9.
    quiet_fit(GAN(), gan_monitors(2), steps=12, tmp_path=tmp_path, loader=gan_loader(6))
    steps = logged(tmp_path, GENERATOR, DISCRIMINATOR, HEALTH, "activation_rms/generator.0")
    assert steps[GENERATOR] == [0, 4, 8]
    assert steps[DISCRIMINATOR] == [1, 5, 9]
    assert steps[HEALTH] == [0, 1, 4, 5, 8, 9]
    assert steps["activation_rms/generator.0"] == [0, 4, 8]  # the batches of the generator's steps 0, 2, 4


def test_a_resumed_fit_goes_on_counting_each_optimizers_steps(tmp_path: Path) -> None:
    first = quiet_fit(GAN(), gan_monitors(2), steps=6, tmp_path=tmp_path / "a", loader=gan_loader(3))
    first.save_checkpoint(tmp_path / "gan.ckpt")  # at an epoch's end: each optimizer has taken 3 steps
    quiet_fit(GAN(), gan_monitors(2), steps=12, tmp_path=tmp_path / "b", loader=gan_loader(3),
              ckpt_path=tmp_path / "gan.ckpt")
    steps = logged(tmp_path / "b", GENERATOR, DISCRIMINATOR, HEALTH, "activation_rms/generator.0")
    # Steps 3, 4, 5 of each optimizer: step 4 is due (global steps 8 and 9), not the first after the resume.
    assert steps[GENERATOR] == steps["activation_rms/generator.0"] == [8]
    assert steps[DISCRIMINATOR] == [9]
    assert steps[HEALTH] == [8, 9]


def test_a_resumed_fit_with_one_optimizer_keeps_the_schedule(tmp_path: Path) -> None:
    quiet_fit(MLP(depth=2), four(3), steps=4, tmp_path=tmp_path / "a").save_checkpoint(tmp_path / "mlp.ckpt")
    quiet_fit(MLP(depth=2), four(3), steps=10, batches=4, tmp_path=tmp_path / "b", ckpt_path=tmp_path / "mlp.ckpt")
    steps = logged(tmp_path / "b", NORM, HEALTH, ACTIVATION, CHECK)
    assert steps[NORM] == steps[HEALTH] == steps[ACTIVATION] == steps[CHECK] == [6, 9]


@pytest.mark.parametrize("sync_free", [False, True])
def test_warnings_are_rate_limited_on_each_optimizers_own_steps(sync_free: bool) -> None:
    # Every layer of both networks "vanishes" at every step: each optimizer warns at its steps 0, 3 (global steps
    # 0, 6 for the generator, 1, 7 for the discriminator), and no more often.
    rules = HealthRules(vanishing_threshold=100.0, exploding_threshold=1e6, vanishing_patience=1, depth_ratio=None)
    monitor = GradHealthMonitor(rules, warn_every_n_steps=3, summary=False, sync_free=sync_free)
    with health_warnings() as messages:
        fit(GAN(), [monitor], steps=10, loader=gan_loader(5))
    steps = [int(re.search(r"at step (\d+)", m).group(1)) for m in messages]
    assert steps == [0, 1, 6, 7]


def test_none_takes_the_trainers_log_every_n_steps(tmp_path: Path) -> None:
    callbacks = [GradNormMonitor(images_every_n_logs=None), GradHealthMonitor(), ActivationMonitor(summary=False)]
    quiet_fit(MLP(depth=2), callbacks, steps=7, tmp_path=tmp_path, log_every_n_steps=3)
    steps = logged(tmp_path, NORM, HEALTH, ACTIVATION)
    assert steps[NORM] == steps[HEALTH] == steps[ACTIVATION] == [0, 3, 6]


@pytest.mark.parametrize(
    ("callback", "argument"),
    [(GradNormMonitor, "log_every_n_steps"), (GradNormMonitor, "histogram_every_n_steps"),
     (GradHealthMonitor, "log_every_n_steps"), (ActivationMonitor, "log_every_n_steps"),
     (GradCheck, "every_n_steps")],
)
@pytest.mark.parametrize("value", [0, -1, 2.0, "5", True])
def test_a_bad_interval_is_refused_at_construction_naming_the_argument(callback, argument: str, value) -> None:
    expected = f"`{argument}={value!r}` is not valid: expected an integer in [1, 9007199254740992] (optimizer steps)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        callback(**{argument: value})


def test_none_is_refused_where_there_is_no_default_interval() -> None:
    with pytest.raises(ValueError, match=re.escape("`every_n_steps=None` is not valid: expected an integer in [1, ")):
        GradCheck(every_n_steps=None)
