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

import gradmon.callbacks.grad_check as grad_check_module
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


def test_the_state_dict_restores_every_field_of_the_results():
    seed_everything(0)
    check = GradCheck(every_n_steps=2, burn_in_steps=0)
    fit(Classifier(), [check], max_steps=3)
    restored = GradCheck(every_n_steps=2, burn_in_steps=0)
    restored.load_state_dict(check.state_dict())
    assert [r.step for r in check.results] == [0, 0, 0, 2, 2, 2]
    assert restored.results == check.results
    assert restored.state_dict() == check.state_dict()


def test_results_saved_before_they_were_layer_checks_still_load():
    check = GradCheck(good_below=1e-7)
    check.load_state_dict(
        {
            "last_step": 4,
            "results": [
                {"step": 2, "layer": "net.0", "rel_error": 1e-9, "passed": True},
                {"step": 2, "layer": "net.3", "rel_error": 1e-4, "passed": True},
                {"step": 4, "layer": "net.3", "rel_error": 0.9, "passed": False},
            ],
        }
    )
    assert [(r.step, r.layer, r.rel_error, r.status, r.passed) for r in check.results] == [
        (2, "net.0", 1e-9, "good", True),
        (2, "net.3", 1e-4, "acceptable", True),
        (4, "net.3", 0.9, "wrong", False),
    ]
    assert check.state_dict()["last_step"] == 4


def test_manual_optimization_is_refused():
    model = Classifier()
    model.automatic_optimization = False
    with pytest.raises(MisconfigurationException, match="automatic optimization"):
        fit(model, [GradCheck()])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": 10**400}, "every_n_steps"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_directions": 0}, "num_directions"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-6}, "eps"),
        ({"eps": 10**400}, "eps"),
        ({"fail_above": float("nan")}, "fail_above"),
        ({"fail_above": 2.0}, "fail_above"),  # a relative error never exceeds 2: nothing could fail
        ({"fail_above": 1e300}, "fail_above"),
        ({"good_below": 0.1, "fail_above": 0.01}, "good_below"),
        ({"burn_in_steps": -1}, "burn_in_steps"),
        ({"on_failure": "ignore"}, "on_failure"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_raise_at_construction_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}="):
        GradCheck(**kwargs)


@pytest.mark.parametrize("value", ["yes", "false", 1, 0, None])
def test_check_at_start_must_be_a_real_bool(value):
    with pytest.raises(TypeError, match="`check_at_start="):
        GradCheck(check_at_start=value)


def test_unknown_on_failure_lists_the_accepted_values():
    with pytest.raises(ValueError, match="'warn', 'stop', 'raise'"):
        GradCheck(on_failure="ignore")


def recording_backend(dtypes):
    """A torch.compile backend that runs the graph eagerly and records the floating dtypes it was compiled for."""

    def backend(graph_module, example_inputs):
        dtypes.update(t.dtype for t in example_inputs if isinstance(t, torch.Tensor) and t.is_floating_point())
        return graph_module.forward

    return backend


class Unlogged(Classifier):
    """Without ``self.log``, which dynamo cannot trace (Lightning's signature inspection of a compiled step)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def test_a_module_compiled_for_fit_is_checked_on_an_uncompiled_float64_copy():
    # trainer.fit(torch.compile(model)) installs compiled forward/training_step on the module itself; the float64
    # copy used to call them, which ran the float32 module on float64 inputs ("Double and Float").
    torch._dynamo.reset()
    seed_everything(0)
    dtypes = set()
    model = Unlogged(wrong_scale=10.0)
    check = GradCheck(every_n_steps=2, burn_in_steps=0)
    with pytest.warns(GradientHealthWarning) as record:
        fit(torch.compile(model, backend=recording_backend(dtypes)), [check], max_steps=3)
    assert [m.split(" (")[0] for m in gradient_health_warnings(record)] == [
        f"GradCheck at step {step}: wrong gradient in layer 'net.3'" for step in (0, 2)
    ]
    assert [(r.step, r.layer, r.passed) for r in check.results] == [
        (step, layer, layer != "net.3") for step in (0, 2) for layer in ("net.0", "net.3", "net.5")
    ]
    assert all(r.rel_error > 0.5 if r.layer == "net.3" else r.rel_error < 1e-3 for r in check.results)
    assert dtypes == {torch.float32}  # the run was compiled, the float64 check never was
    assert hasattr(vars(model)["training_step"], "_torchdynamo_orig_callable")  # and the run stays compiled


class CompiledSubmodule(Classifier):
    def __init__(self, backend):
        super().__init__()
        self.net = torch.compile(self.net, backend=backend)


def test_a_compiled_submodule_is_logged_under_the_users_layer_names(tmp_path):
    torch._dynamo.reset()
    seed_everything(0)
    dtypes = set()
    logger = TensorBoardLogger(tmp_path, name="run")
    check = GradCheck(every_n_steps=2, check_at_start=False)
    fit(CompiledSubmodule(recording_backend(dtypes)), [check], max_steps=5, logger=logger)
    layers = ["net.0", "net.3", "net.5"]
    assert [(r.step, r.layer) for r in check.results] == [(step, layer) for step in (2, 4) for layer in layers]
    assert all(r.passed for r in check.results)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = {tag for tag in events.Tags()["scalars"] if tag.startswith("gradcheck/")}
    assert tags == {f"gradcheck/rel_error/{layer}" for layer in layers} | {"gradcheck/max_rel_error"}
    assert [e.step for e in events.Scalars("gradcheck/rel_error/net.0")] == [2, 4]
    assert dtypes == {torch.float32}


def test_a_reused_instance_checks_a_fresh_fit_from_the_start():
    seed_everything(0)
    check = GradCheck(every_n_steps=2, burn_in_steps=0)
    fit(Classifier(), [check], max_steps=3)
    first = check.results
    with pytest.warns(GradientHealthWarning) as record:
        fit(Classifier(wrong_scale=10.0), [check], max_steps=3)
    assert [m.split(" (")[0] for m in gradient_health_warnings(record)] == [
        f"GradCheck at step {step}: wrong gradient in layer 'net.3'" for step in (0, 2)
    ]
    assert [(r.step, r.layer, r.passed) for r in check.results] == [
        (step, layer, layer != "net.3") for step in (0, 2) for layer in ("net.0", "net.3", "net.5")
    ]
    assert [(r.step, r.passed) for r in first if r.layer == "net.3"] == [(0, True), (2, True)]


def test_a_resume_with_the_same_instance_keeps_its_results_and_schedule(tmp_path):
    seed_everything(0)
    check = GradCheck(every_n_steps=2, burn_in_steps=0)
    trainer = fit(Classifier(), [check], max_steps=3)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    fit(Classifier(), [check], max_steps=5, ckpt_path=tmp_path / "last.ckpt")
    # Without the checkpoint's state the resumed fit would check at its first batch, step 3.
    assert [r.step for r in check.results if r.layer == "net.0"] == [0, 2, 4]


def test_the_per_check_seed_wraps_around_at_2_64(monkeypatch):
    seeds = []
    real = grad_check_module.check_gradients

    def spy(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(grad_check_module, "check_gradients", spy)
    seed_everything(0)
    check = GradCheck(every_n_steps=2, burn_in_steps=0, seed=2**64 - 1)
    fit(Classifier(), [check], max_steps=5)
    assert [r.step for r in check.results if r.layer == "net.0"] == [0, 2, 4]
    assert seeds == [2**64 - 1, 1, 3]


class ConvNet(LightningModule):
    """Conv, BatchNorm2d, ReLU, pooling, Linear: layers ``net.0``, ``net.1`` (the BatchNorm) and ``net.5``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4, 3),
        )
        self.training_steps = 0

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, 1, 6, 6, generator=generator), torch.randint(0, 3, (32,), generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=8)


def test_one_sample_with_batchnorm_in_training_mode_is_refused_at_setup_naming_num_samples_and_the_layer():
    model = ConvNet()
    message = (
        r"`num_samples=1` is not valid: expected at least 2, since BatchNorm in training mode needs >= 2 samples "
        r"\(layer 'net\.1' is BatchNorm in training mode\)"
    )
    with pytest.raises(ValueError, match=message):
        fit(model, [GradCheck(every_n_steps=2, num_samples=1)])
    assert model.training_steps == 0


def test_two_samples_with_batchnorm_and_one_with_a_frozen_batchnorm_are_checked():
    seed_everything(0)
    check = GradCheck(every_n_steps=2, burn_in_steps=0, num_samples=2)
    fit(ConvNet(), [check], max_steps=3)
    frozen = ConvNet()
    frozen.net[1].eval()  # normalizes with its running statistics: one sample is enough
    one = GradCheck(every_n_steps=2, burn_in_steps=0, num_samples=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Found .* module\\(s\\) in eval mode")
        fit(frozen, [one], max_steps=3)
    for results in (check.results, one.results):
        layers = [(r.step, r.layer) for r in results]
        assert layers == [(step, layer) for step in (0, 2) for layer in ("net.0", "net.1", "net.5")]
        assert all(r.passed for r in results)


def test_batchnorm_put_in_training_mode_after_setup_is_refused_at_the_first_check():
    class Unfrozen(ConvNet):
        def on_train_start(self):
            self.net[1].train()

    model = Unfrozen()
    model.net[1].eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Found .* module\\(s\\) in eval mode")
        with pytest.raises(ValueError, match=r"`num_samples=1` is not valid.*'net\.1'"):
            fit(model, [GradCheck(every_n_steps=2, burn_in_steps=1, num_samples=1)])
    assert model.training_steps == 1  # step 0 trained, the check due at step 1 refused


@pytest.mark.parametrize("retries", [0, 12])
def test_retries_are_the_callbacks_to_set_and_many_of_them_still_catch_a_doubled_gradient(retries, monkeypatch):
    seen = []
    real = grad_check_module.check_gradients
    monkeypatch.setattr(grad_check_module, "check_gradients",
                        lambda *a, **k: seen.append(k["retries"]) or real(*a, **k))
    seed_everything(0)
    check = GradCheck(every_n_steps=100, check_at_start=True, burn_in_steps=0, retries=retries)
    with pytest.warns(GradientHealthWarning, match=r"step 0: wrong gradient in layer 'net\.3'"):
        fit(Classifier(wrong_scale=2.0), [check], max_steps=1)
    assert seen == [retries]
    assert {r.layer: r.status for r in check.results}["net.3"] == "wrong"


@pytest.mark.parametrize("eps", [1e-11, 1e-14, 1e-20, 1e-300, 1.5])
def test_an_eps_where_rounding_swamps_the_difference_is_refused_naming_it_and_the_range(eps):
    # At eps=1e-13 a gradient 10 times too large passed (rounding / eps hides the difference); at 1e-20, as "good".
    with pytest.raises(ValueError, match=rf"`eps={eps!r}` is not valid: expected a finite number >= 1e-10 and <= 1"):
        GradCheck(eps=eps)


def test_a_wrong_gradient_fails_at_the_smallest_accepted_eps():
    seed_everything(0)
    check = GradCheck(every_n_steps=100, burn_in_steps=0, eps=grad_check_module.EPS_RANGE[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(Classifier(wrong_scale=10.0), [check], max_steps=1)
    assert [(r.layer, r.passed) for r in check.results] == [("net.0", True), ("net.3", False), ("net.5", True)]


def test_results_are_capped_in_memory_and_checkpoints_while_the_counts_stay_whole(tmp_path):
    seed_everything(0)
    check = GradCheck(every_n_steps=1, burn_in_steps=0, num_samples=2, num_directions=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = fit(Classifier(wrong_scale=10.0), [check], max_steps=40, limit_train_batches=4, max_epochs=None)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert check.checks == 40
    assert check.failures["net.3"] == 40 and check.failures["net.0"] == check.failures["net.5"] == 0
    assert len(check.results) == grad_check_module.RESULTS_KEPT  # 40 checks of 3 layers: 120 made
    assert [r.step for r in check.results[-3:]] == [39, 39, 39] and check.results[0].step == 6
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if k.startswith("GradCheck"))
    assert len(state["results"]) == 100 and state["checks"] == 40 and state["failures"] == {"net.3": 40}
    resumed = GradCheck(every_n_steps=1, burn_in_steps=0, num_samples=2, num_directions=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(Classifier(wrong_scale=10.0), [resumed], max_steps=42, limit_train_batches=4, max_epochs=None,
            ckpt_path=tmp_path / "last.ckpt")
    assert resumed.checks == 42 and resumed.failures["net.3"] == 42
    assert len(resumed.results) == 100 and resumed.results[-1].step == 41


def test_a_check_of_more_layers_than_the_cap_keeps_every_layer_of_the_latest_check():
    check = GradCheck()
    layers = [{"step": 7, "layer": f"l{i}", "rel_error": 0.0, "passed": True} for i in range(150)]
    check.load_state_dict({"last_step": 7, "results": layers})
    assert len(check.results) == 150 and check.checks == 1
