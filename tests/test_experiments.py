"""Each experiment shows what it exists to show, read back from what it logged.

Every training config runs for a few steps through the same CLI as ``python -m experiments fit --config ...``, with
its logs in a temporary directory, and the assertions read the TensorBoard event files (or the callbacks' records).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import accumulator

import gradmon
from experiments import matrix_product, sigmoid
from experiments.cli import CONFIG_DIR, cli_main, fit_config
from experiments.demo import CONFIGS, VARIANTS, quiet, train
from experiments.gradcheck_bug import PLANTED_LAYER, LinearWrongWeightGrad
from gradmon import GradHealthMonitor
from gradmon.report import layer_norms, load_run

EPOCHS, BATCHES = 2, 3
MAX_STEPS = EPOCHS * BATCHES

pytestmark = [
    pytest.mark.slow,  # the experiments train real models
    pytest.mark.filterwarnings("ignore::gradmon.GradientHealthWarning", "ignore:.*LightningCLI's args parameter.*"),
]


def test_rerunning_a_variant_replaces_its_run_instead_of_adding_a_second_event_file(tmp_path, capsys):
    for depth in (16, 3):
        fit_config("vanishing_tanh", tmp_path, f"--model.depth={depth}", "--trainer.max_epochs=1",
                   "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1")
    run_dir = tmp_path / "vanishing" / "tanh"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert "replacing the earlier run" in capsys.readouterr().out
    assert load_run(run_dir).layers() == ["net.0", "net.2", "net.4", "net.6"]  # the second run's 3 + head only


def test_sigmoid_gradient_peaks_at_a_quarter_and_is_3e_4_at_8():
    x = torch.linspace(-8.0, 8.0, 161)
    y, grad = sigmoid.sigmoid_and_gradient(x)
    assert grad.max().item() == pytest.approx(0.25, abs=1e-6)
    assert x[grad.argmax()].item() == pytest.approx(0.0, abs=1e-6)
    expected_at_8 = math.exp(-8) / (1 + math.exp(-8)) ** 2  # 3.3535e-4
    assert grad[0].item() == pytest.approx(expected_at_8, rel=1e-3)
    assert grad[-1].item() == pytest.approx(expected_at_8, rel=1e-3)
    torch.testing.assert_close(y, torch.sigmoid(x))


def test_sigmoid_run_writes_a_png_and_a_tensorboard_image(tmp_path):
    png = sigmoid.run(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert accumulator(tmp_path / "sigmoid" / "saturation").Tags()["images"] == ["sigmoid/curve_and_gradient"]


def test_matrix_product_explodes_for_standard_normal_and_not_when_scaled():
    standard = matrix_product.product_norms("standard_normal", k_max=50).median(dim=0).values
    scaled = matrix_product.product_norms("scaled", k_max=50).median(dim=0).values
    orthogonal = matrix_product.product_norms("orthogonal", k_max=50)
    assert standard[-1] > 1e10  # the tutorial's entries near 1e12
    # Variance 1/n keeps the mean square; at width 4 the median still drifts about 0.06 decades per factor.
    assert 1e-4 < scaled[-1] < 1.0
    torch.testing.assert_close(orthogonal, torch.full_like(orthogonal, 2.0))  # sqrt(4): exactly preserved


def test_matrix_product_run_logs_the_median_norm_per_k_for_every_variant(tmp_path):
    matrix_product.run(tmp_path, k_max=10, draws=16)
    for variant in matrix_product.FACTORS:
        series = load_run(tmp_path / "matrix_product" / variant).scalars["matrix_product/norm"]
        assert series.steps.tolist() == list(range(1, 11))
    assert (tmp_path / "matrix_product" / "matrix_product.png").stat().st_size > 10_000


def test_the_planted_backward_fails_torch_gradcheck_and_nn_linear_passes():
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    for layer, passes in ((LinearWrongWeightGrad(3, 2), False), (torch.nn.Linear(3, 2), True)):
        layer = layer.double()
        check = torch.autograd.gradcheck(
            lambda w, layer=layer: torch.func.functional_call(layer, {"weight": w}, x),
            (layer.weight.detach().requires_grad_(),),
            raise_exception=False,
        )
        assert check is passes


def test_cli_overrides_reach_the_model_and_the_data_sizes_are_linked(tmp_path):
    cli = cli_main(
        [
            "--config",
            str(CONFIG_DIR / "vanishing_sigmoid.yaml"),
            "--model.depth=20",
            "--trainer.max_epochs=3",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        run=False,
    )
    linears = [m for m in cli.model.net if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 21
    assert (linears[0].in_features, linears[-1].out_features) == (64, 10)
    assert cli.trainer.max_epochs == 3
    assert (cli.trainer.logger.name, cli.trainer.logger.version) == ("vanishing", "sigmoid")



def health_config(tmp_path: Path, init_args: str) -> str:
    """A config whose only callback is a GradHealthMonitor with ``init_args`` (YAML flow mapping)."""
    path = tmp_path / "health.yaml"
    path.write_text(f"trainer:\n  callbacks:\n    - class_path: gradmon.GradHealthMonitor\n"
                    f"      init_args: {init_args}\n")
    return str(path)


def test_grad_health_monitors_rules_are_nested_init_args_in_a_cli_config(tmp_path):
    config = health_config(tmp_path, "{rules: {vanishing_threshold: 1.0e-6}, on_exploding: stop}")
    cli = cli_main(["--config", config, f"--trainer.logger.init_args.save_dir={tmp_path}"], run=False)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, GradHealthMonitor)]
    assert monitor.rules == gradmon.HealthRules(vanishing_threshold=1e-6)
    assert monitor.actions == {"vanishing": "warn", "exploding": "stop", "nonfinite": "warn"}
    # Overridden on the command line too, one rule at a time.
    cli = cli_main(["--config", config, f"--trainer.logger.init_args.save_dir={tmp_path}",
                    "--trainer.callbacks.rules.exploding_threshold=1e3"], run=False)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, GradHealthMonitor)]
    assert monitor.rules == gradmon.HealthRules(vanishing_threshold=1e-6, exploding_threshold=1e3)


def test_a_bad_rule_in_a_cli_config_is_refused_naming_the_rule_and_what_is_accepted(tmp_path):
    config = health_config(tmp_path, "{rules: {vanishing_threshold: -1.0}}")
    with pytest.raises(ValueError) as error:
        cli_main(["--config", config, f"--trainer.logger.init_args.save_dir={tmp_path}"], run=False)
    chain = []
    cause: BaseException | None = error.value
    while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    assert any("`vanishing_threshold=-1.0` is not valid: expected a finite number >= 0" in m for m in chain), chain

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """Every config, two epochs of three batches with every step logged: config name -> (CLI, run directory)."""
    logdir = tmp_path_factory.mktemp("runs")
    done = {}
    for config in CONFIGS:
        cli = fit_config(config, logdir, f"--trainer.max_epochs={EPOCHS}", f"--trainer.limit_train_batches={BATCHES}",
                         "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1")
        done[config] = (cli, Path(cli.trainer.logger.log_dir))
    return done


def first_layer_and_last(run_dir: Path) -> tuple[float, float]:
    """First and last layer's gradient norm at the first logged step, before training has changed anything."""
    _, norms = layer_norms(load_run(run_dir), 0)
    values = list(norms.values())
    return values[0], values[-1]


def callback(cli, kind: type):
    return next(c for c in cli.trainer.callbacks if isinstance(c, kind))


def test_every_variant_is_its_own_run_with_hparams_config_and_accuracy(runs):
    directories = {(d.parent.name, d.name) for _, d in runs.values()}
    assert len(directories) == len(CONFIGS)
    for _, run_dir in runs.values():
        assert "depth:" in (run_dir / "hparams.yaml").read_text()
        assert (run_dir / "config.yaml").is_file()
        assert {"train/loss", "train/acc", "val/acc"} <= set(load_run(run_dir).scalars), run_dir


def test_deep_sigmoid_starves_its_first_layer_and_relu_and_tanh_do_not(runs):
    sigmoid_first, sigmoid_last = first_layer_and_last(runs["vanishing_sigmoid"][1])
    relu_first, _ = first_layer_and_last(runs["vanishing_relu"][1])
    tanh_first, tanh_last = first_layer_and_last(runs["vanishing_tanh"][1])
    assert sigmoid_first < 1e-6 * sigmoid_last  # about 0.25 per layer over 16 layers
    assert sigmoid_first < 1e-4 * relu_first
    assert 1e-1 < tanh_first / tanh_last < 1e1


def test_initialisations_order_the_first_layer_gradient_by_their_scale(runs):
    first = {
        v: first_layer_and_last(runs[f"init_{v}"][1])[0]
        for v in ("normal_0.01", "default", "xavier", "kaiming", "normal_1")
    }
    assert list(first) == sorted(first, key=first.get), first
    assert first["normal_0.01"] < 1e-12 and first["normal_1"] > 1e6
    kaiming_first, kaiming_last = first_layer_and_last(runs["init_kaiming"][1])
    assert 1e-1 < kaiming_first / kaiming_last < 1e1  # the gain sqrt(2) keeps every layer's gradient alike


def test_every_demo_run_gets_its_cause_and_the_healthy_ones_none(runs):
    # The causes are each config's demo.diagnosis (its findings other than non-finite values; none for the healthy
    # runs): the table. Each is found at the first step, and a single cause is the run's verdict.
    assert [v.name for v in VARIANTS] == list(runs)
    for variant in VARIANTS:
        expected = variant.diagnosis
        assert expected is not None, f"{variant.path} states no demo.diagnosis"
        cli = runs[variant.name][0]
        found = callback(cli, gradmon.ActivationMonitor).found
        causes = {cause for cause, f in found.items() if f.condition != "nonfinite"}
        assert causes == expected, (variant.name, [str(f) for f in found.values()])
        assert all(found[cause].step == 0 for cause in expected), variant.name
        if len(expected) <= 1:
            verdict = gradmon.verdict(cli.trainer)
            assert (verdict.cause if verdict else None) == next(iter(expected), None), (variant.name, verdict)
            assert verdict is None or verdict.finding.step == 0, variant.name
    # N(0, 1) turns non-finite after its first step: the forward pass overflows, then the weights are NaN.
    found = callback(runs["init_normal_1"][0], gradmon.ActivationMonitor).found
    assert {c for c, f in found.items() if f.condition == "nonfinite"} == {"activation_overflow", "gradient_spike"}
    assert "the total gradient norm was" in found["activation_overflow"].explanation


def test_the_silent_xavier_relu_run_gets_a_gain_mismatch_finding_in_tensorboard(runs):
    cli, run_dir = runs["vanishing_relu"]
    assert not callback(cli, gradmon.GradHealthMonitor).flagged_steps  # the thresholds stay quiet
    (event,) = accumulator(run_dir).Tensors("diagnosis/forward_decay/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 0 and "init gain mismatch" in text and "kaiming_normal(nonlinearity='relu')" in text
    assert "keeps 0.71 of the forward signal" in text


def test_exploding_run_is_stopped_by_grad_health_monitor(runs):
    cli, run_dir = runs["exploding_relu"]
    assert cli.trainer.global_step < MAX_STEPS
    events = callback(cli, gradmon.GradHealthMonitor).events
    assert events and events[0].condition == "exploding" and events[0].step == 0
    assert load_run(run_dir).scalars["grad_health/exploding"].values[0] > 0


def test_gradcheck_names_the_planted_layer_and_stops_the_buggy_run(runs):
    cli, run_dir = runs["gradcheck_buggy"]
    results = callback(cli, gradmon.GradCheck).results
    assert {r.layer for r in results if not r.passed} == {PLANTED_LAYER}
    assert cli.trainer.global_step < MAX_STEPS
    assert load_run(run_dir).scalars[f"gradcheck/rel_error/{PLANTED_LAYER}"].values[0] > 0.1


def test_gradcheck_passes_the_fixed_model(runs):
    cli, run_dir = runs["gradcheck_fixed"]
    results = callback(cli, gradmon.GradCheck).results
    assert results and all(r.passed for r in results)
    assert cli.trainer.global_step == MAX_STEPS
    assert load_run(run_dir).scalars["gradcheck/max_rel_error"].values.max() < 1e-4


def test_the_hparams_tab_holds_the_model_settings_the_init_scheme_and_the_accuracy(runs):
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = accumulator(runs["init_kaiming"][1])
    content = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["depth"].number_value == 16
    assert hparams["weight_init_0"].string_value == "kaiming_normal(nonlinearity='relu')"
    assert "hp/val_acc" in acc.Tags()["scalars"]


def test_a_demo_run_prints_one_line_with_its_steps_accuracy_and_findings(tmp_path, capfd, caplog):
    with quiet():
        line = train("init_normal_1", tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
                     "--trainer.limit_val_batches=1")
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # nothing but the returned line: no tables, tips, summaries or warnings
    assert not [r for r in caplog.records if r.levelno >= 20 and r.name.startswith(("lightning", "gradmon"))]
    assert line.split()[:4] == ["init/normal_1", "3", "steps", "val"]
    assert "exploding at 1 step from step 0" in line and "nonfinite at 2 steps from step 1" in line
    assert "diagnosis: init scale too large (step 0)" in line


def test_the_benchmark_times_steps_and_gradmons_hooks(tmp_path):
    from experiments import benchmark, profile_hooks

    step_ms, hook_us = benchmark.run("gradmon", depth=2, width=8, steps=benchmark.WARMUP_STEPS + 5,
                                     logdir=str(tmp_path), device="cpu")
    assert step_ms > 0 and 0 < hook_us < 1e3 * step_ms
    assert benchmark.run("none", 2, 8, benchmark.WARMUP_STEPS + 5, str(tmp_path), "cpu")[1] == 0.0
    # The split of (b)'s in-hook time: the median step that does not log, and the logging steps' excess per step.
    clock = benchmark.HookClock()
    clock.per_step = {19: 1.0, 20: 1e-4, 21: 1e-4, 50: 1e-3, 51: 3e-4, 52: 1e-4}  # step 19: warm-up, left out
    assert clock.split_us() == pytest.approx((100.0, (900.0 + 200.0) / 5))
    # Each run's own share: 300 us in hooks of a 6.3 ms step is 300 / 6000 of the step without them.
    assert benchmark.same_run_share(300.0, 6.3) == pytest.approx(5.0)
    parts = profile_hooks.profile(steps=benchmark.WARMUP_STEPS + 5, depth=2, width=8)
    assert parts["kernel"] > 0 and parts["rules"] > 0
    assert parts["total"] == pytest.approx(sum(parts[k] for k in ("kernel", "transfer", "rules", "bookkeeping")))


def test_the_benchmarks_targets_show_each_runs_own_share_beside_the_cross_run_one(capsys):
    from experiments import benchmark

    # (a), (b), (c), (f) in ms; in-hook (b), (f), (m) in us.
    results = {"20x64": (5.0, 5.3, 26.0, 5.1, 310.0, 150.0, 220.0),
               "4x512": (12.0, 12.2, 17.0, 12.0, 500.0, 300.0, 0.0)}
    steady = {"20x64": {"gradmon": 6.4, "floor": 3.1, "minimal": 4.6}, "4x512": {"gradmon": 4.3, "floor": 2.5}}
    benchmark.print_targets(results, steady)
    lines = capsys.readouterr().out.splitlines()
    assert ("  NOT met  20x64 in-hook cost <= 5% of a step without monitoring (the floor's own: 3.0%; (m)'s: 4.4%; "
            "within each run: (b) 6.40%, (f) 3.10%, (m) 4.60%): 6.200%") in lines
    assert ("  met      4x512 in-hook (b) - in-hook (f) <= 2% of a step without monitoring "
            "(within each run: 1.80%): 1.667%") in lines
    benchmark.print_targets(results)  # without the runs' own shares: the cross-run ones alone
    assert "within each run" not in capsys.readouterr().out


def test_the_benchmarks_minimal_health_check_does_the_rules_arithmetic(tmp_path):
    """(m) is a bound only if it does what the health rules do on a healthy step: its running means of log norms are
    HealthTracker's bit for bit after a run past the warm-up (spike and depth tests active), every step judged."""
    from experiments import benchmark
    from experiments.models import kaiming_mlp

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = kaiming_mlp(benchmark.IN_FEATURES, benchmark.NUM_CLASSES, 4, 16)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    minimal, health = benchmark.MinimalHealthCheck(), GradHealthMonitor()
    steps = 30
    x, y = torch.randn(8 * steps, benchmark.IN_FEATURES), torch.randint(0, benchmark.NUM_CLASSES, (8 * steps,))
    pl.Trainer(max_steps=steps, callbacks=[minimal, health], logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path).fit(
        Net(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8))
    assert health.events == [] and minimal.unhealthy == 0 and minimal.seen == steps
    state = health.tracker.state_dict()
    assert list(state["mean_log"]) == ["net.0", "net.2", "net.4", "net.6", "net.8"]
    assert minimal.means == list(state["mean_log"].values())
    assert state["seen"] == dict.fromkeys(state["mean_log"], steps)
