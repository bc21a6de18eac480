import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import WrongLinear
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradmon import GradCheck, GradientHealthError, GradientHealthWarning


class Classifier(LightningModule):
    """An MLP whose layers are ``net.0``, ``net.3`` (the wrong one) and ``net.5``; with BatchNorm ``net.0``, ``net.1``,
    ``net.4`` and ``net.6``."""

    def __init__(self, wrong_scale=None, dropout=0.0, batchnorm=False, dict_batches=False):
        super().__init__()
        middle = nn.Linear(16, 16) if wrong_scale is None else WrongLinear(16, 16, scale=wrong_scale)
        norm = [nn.BatchNorm1d(16)] if batchnorm else []
        self.net = nn.Sequential(
            nn.Linear(8, 16), *norm, nn.ReLU(), nn.Dropout(dropout), middle, nn.ReLU(), nn.Linear(16, 3)
        )
        self.dict_batches = dict_batches

    def training_step(self, batch, batch_idx):
        x, y = (batch["inputs"]["x"], batch["y"]) if self.dict_batches else batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        self.log_dict({"step_parity": float(self.global_step % 2)})
        return {"loss": loss} if self.dict_batches else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator)
        if self.dict_batches:
            data = [{"inputs": {"x": xi}, "y": yi, "name": "sample"} for xi, yi in zip(x, y)]
            return DataLoader(data, batch_size=16, shuffle=True)
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.records = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def fit(model, callbacks=(), max_steps=4, logger=False, ckpt_path=None, **trainer_kwargs):
    trainer = Trainer(
        max_steps=max_steps,
        callbacks=list(callbacks),
        logger=logger,
        accelerator="cpu",
        deterministic=True,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def gradient_health_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, GradientHealthWarning)]


@pytest.mark.parametrize("scale", [10.0, -1.0])
def test_wrong_backward_is_caught_at_the_first_check_and_its_layer_named(scale):
    seed_everything(0)
    check = GradCheck(every_n_steps=100, check_at_start=True, burn_in_steps=0)
    with pytest.warns(GradientHealthWarning, match=r"step 0: wrong gradient in layer 'net\.3' \(relative error"):
        fit(Classifier(wrong_scale=scale), [check], max_steps=2)
    passed = {(r.step, r.layer): r.passed for r in check.results}
    assert passed == {(0, "net.0"): True, (0, "net.3"): False, (0, "net.5"): True}
    assert next(r.rel_error for r in check.results if r.layer == "net.3") > 0.5


def test_on_failure_raise_raises_a_gradient_health_error_naming_layer_and_step():
    seed_everything(0)
    with pytest.raises(GradientHealthError, match=r"step 2: wrong gradient in layer 'net\.3'"):
        fit(Classifier(wrong_scale=10.0), [GradCheck(every_n_steps=2, check_at_start=False, on_failure="raise")])


def test_on_failure_stop_stops_the_trainer_after_the_failing_step():
    seed_everything(0)
    check = GradCheck(every_n_steps=2, check_at_start=False, on_failure="stop")
    with pytest.warns(GradientHealthWarning, match=r"step 2: wrong gradient in layer 'net\.3'.*Stopping the run"):
        trainer = fit(Classifier(wrong_scale=10.0), [check], max_steps=20)
    assert trainer.should_stop
    assert trainer.global_step == 3


def test_correct_mlps_with_relu_dropout_and_batchnorm_pass_repeated_checks():
    seed_everything(0)
    check = GradCheck(every_n_steps=1, burn_in_steps=0, num_samples=8, num_directions=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(Classifier(dropout=0.5, batchnorm=True), [check], max_steps=12)
    assert gradient_health_warnings(record) == []
    assert sorted({r.step for r in check.results}) == list(range(12))
    assert {r.layer for r in check.results} == {"net.0", "net.1", "net.4", "net.6"}
    assert all(r.passed for r in check.results)


def test_a_run_with_the_check_ends_like_a_run_without_it():
    def run(callbacks):
        seed_everything(0)
        model, logger = Classifier(dropout=0.5, batchnorm=True), RecordingLogger()
        trainer = fit(model, callbacks, max_steps=8, logger=logger)
        metrics = [(step, {k: v for k, v in m.items() if not k.startswith("gradcheck/")}) for step, m in logger.records]
        return model, trainer, [(step, m) for step, m in metrics if m], torch.get_rng_state()

    model, trainer, metrics, rng = run([])
    # No check at step 0: a `self.log` leaking from the check there would be overwritten by the step's own call.
    checked = run([GradCheck(every_n_steps=2, check_at_start=False)])
    checked_model, checked_trainer, checked_metrics, checked_rng = checked

    state, checked_state = model.state_dict(), checked_model.state_dict()
    assert "net.1.running_mean" in state and "net.1.num_batches_tracked" in state
    assert state.keys() == checked_state.keys()
    assert all(torch.equal(state[k], checked_state[k]) for k in state)
    assert metrics == checked_metrics and len(metrics) == 8
    assert trainer.logged_metrics == checked_trainer.logged_metrics
    assert torch.equal(rng, checked_rng)


def test_under_gradient_accumulation_each_optimizer_step_is_checked_once():
    seed_everything(0)
    check = GradCheck(every_n_steps=1, burn_in_steps=0)
    fit(Classifier(), [check], max_steps=3, accumulate_grad_batches=2)
    assert [r.step for r in check.results if r.layer == "net.0"] == [0, 1, 2]


def test_every_tensor_of_a_nested_batch_is_sliced_and_a_dict_output_is_read():
    seed_everything(0)
    check = GradCheck(every_n_steps=1, burn_in_steps=0, num_samples=4)
    fit(Classifier(dict_batches=True), [check], max_steps=2)
    assert len(check.results) == 6 and all(r.passed for r in check.results)


def test_tags_are_read_back_from_tensorboard_at_the_check_steps(tmp_path):
    seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    fit(Classifier(), [GradCheck(every_n_steps=2, check_at_start=False)], max_steps=5, logger=logger)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    layer_tags = {f"gradcheck/rel_error/net.{i}" for i in (0, 3, 5)}
    assert layer_tags | {"gradcheck/max_rel_error"} <= set(events.Tags()["scalars"])
    for tag in layer_tags | {"gradcheck/max_rel_error"}:
        assert [e.step for e in events.Scalars(tag)] == [2, 4]
    worst = [max(events.Scalars(tag)[i].value for tag in layer_tags) for i in range(2)]
    assert [e.value for e in events.Scalars("gradcheck/max_rel_error")] == pytest.approx(worst)


def test_a_resumed_run_continues_the_schedule_and_keeps_the_results(tmp_path):
    seed_everything(0)
    first = GradCheck(every_n_steps=2, burn_in_steps=0)
    trainer = fit(Classifier(), [first], max_steps=3)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = GradCheck(every_n_steps=2, burn_in_steps=0)
    fit(Classifier(), [resumed], max_steps=5, ckpt_path=tmp_path / "last.ckpt")
    assert [r.step for r in first.results if r.layer == "net.0"] == [0, 2]
    assert [r.step for r in resumed.results if r.layer == "net.0"] == [0, 2, 4]


def test_manual_optimization_is_refused():
    model = Classifier()
    model.automatic_optimization = False
    with pytest.raises(MisconfigurationException, match="automatic optimization"):
        fit(model, [GradCheck()])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_directions": 0}, "num_directions"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-6}, "eps"),
        ({"fail_above": float("nan")}, "fail_above"),
        ({"good_below": 0.1, "fail_above": 0.01}, "good_below"),
        ({"burn_in_steps": -1}, "burn_in_steps"),
        ({"check_at_start": "yes"}, "check_at_start"),
        ({"on_failure": "ignore"}, "on_failure"),
        ({"check_at_start": 1}, "check_at_start"),
    ],
)
def test_invalid_arguments_raise_at_construction_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}="):
        GradCheck(**kwargs)


def test_unknown_on_failure_lists_the_accepted_values():
    with pytest.raises(ValueError, match="'warn', 'stop', 'raise'"):
        GradCheck(on_failure="ignore")
