"""gradmon.report and the ``gradmon report`` command: synthetic event files for the reading rules, one real
training run for the end-to-end check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from gradmon.cli import main
from gradmon.report import find_runs, health_summary, layer_matrix, load_run, load_runs, write_report
from gradmon.tensorboard import write_scalars

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.filterwarnings(
    "ignore::gradmon.GradientHealthWarning", "ignore:.*LightningCLI's args parameter.*"
)


def write_run(path: Path, steps: dict[int, dict[str, float]]) -> Path:
    with SummaryWriter(str(path)) as writer:
        for step, values in steps.items():
            write_scalars(writer, values, step)
    return path


def grad_norms(norms: dict[str, float]) -> dict[str, float]:
    values = {f"grad_norm/{layer}": v for layer, v in norms.items()}
    values["grad_norm/total"] = float(np.sqrt(sum(v * v for v in norms.values())))
    values.update({f"grad_norm_log10/{layer}": float(np.log10(v)) for layer, v in norms.items() if v > 0})
    return values


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    height, width, _ = matplotlib.image.imread(path).shape
    assert height >= 200 and width >= 400, (path, height, width)


def test_find_runs_raises_for_a_logdir_without_event_files(tmp_path):
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        find_runs(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_runs(tmp_path / "missing")


def test_cli_exits_2_with_a_message_for_a_logdir_without_event_files(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err


def test_runs_are_named_by_their_path_under_the_logdir(tmp_path):
    write_run(tmp_path / "vanishing" / "sigmoid", {0: {"a": 1.0}})
    write_run(tmp_path / "vanishing" / "relu", {0: {"a": 1.0}})
    assert [run.name for run in load_runs(tmp_path)] == ["vanishing/relu", "vanishing/sigmoid"]


def test_layers_keep_the_first_logged_order_not_the_alphabetical_one(tmp_path):
    # "net.10" sorts before "net.2" as text; depth order is registration order, which is logging order.
    norms = {"net.0": 1e-6, "net.2": 1e-3, "net.10": 1.0}
    run = load_run(write_run(tmp_path / "run", {0: grad_norms(norms), 5: grad_norms(norms)}))
    assert run.layers() == ["net.0", "net.2", "net.10"]
    assert run.layers("grad_norm_log10/") == ["net.0", "net.2", "net.10"]


def test_layer_matrix_has_a_nan_column_where_a_norm_was_not_finite(tmp_path):
    steps = {0: grad_norms({"net.0": 10.0, "net.2": 100.0}), 5: grad_norms({"net.0": float("nan"), "net.2": 1e3})}
    layers, logged, values = layer_matrix(load_run(write_run(tmp_path / "run", steps)))
    assert layers == ["net.0", "net.2"]
    assert logged.tolist() == [0, 5]
    np.testing.assert_allclose(values, [[1.0, np.nan], [2.0, 3.0]])


def test_health_summary_counts_flagged_steps_from_their_first_and_reads_gradcheck(tmp_path):
    health = {"grad_health/vanishing": 0.0, "grad_health/exploding": 0.0, "grad_health/nonfinite": 0.0}
    steps = {
        0: {**health, "grad_health/skipped_steps": 0.0, "gradcheck/max_rel_error": 0.9},
        3: {**health, "grad_health/exploding": 4.0, "grad_health/skipped_steps": 1.0},
        4: {**health, "grad_health/exploding": 2.0, "grad_health/nonfinite": 1.0, "grad_health/skipped_steps": 2.0},
        5: {**health, "grad_health/skipped_steps": 2.0, "gradcheck/max_rel_error": 1e-8},
    }
    summary = health_summary(load_run(write_run(tmp_path / "run", steps)))
    assert summary.flagged_steps == {"vanishing": 0, "exploding": 2, "nonfinite": 1}
    assert summary.first_flagged == {"vanishing": None, "exploding": 3, "nonfinite": 4}
    assert summary.skipped_steps == 2
    assert summary.gradcheck_max_rel_error == pytest.approx(0.9)
    assert summary.last_step == 5


def test_report_of_synthetic_runs_writes_one_set_of_figures_per_monitored_run_and_a_comparison(tmp_path):
    logdir, out = tmp_path / "runs", tmp_path / "report"
    depth = [f"net.{2 * i}" for i in range(6)]
    for variant, factor in (("sigmoid", 0.25), ("relu", 0.9)):
        norms = {layer: factor ** (len(depth) - i) for i, layer in enumerate(depth)}
        write_run(logdir / "vanishing" / variant, {s: grad_norms(norms) for s in range(0, 50, 5)})
    write_run(logdir / "matrix_product" / "scaled", {1: {"matrix_product/norm": 2.0}})

    written = write_report(logdir, out)

    names = sorted(p.relative_to(out).as_posix() for p in written)
    assert names == [
        "summary.md",
        "vanishing/gradient_flow_comparison.png",
        *[
            f"vanishing/{v}/{f}.png"
            for v in ("relu", "sigmoid")
            for f in ("grad_norm_curves", "grad_norm_heatmap", "gradient_flow")
        ],
    ]
    for path in written[:-1]:
        assert_valid_png(path)
    summary = (out / "summary.md").read_text()
    assert "| `vanishing/sigmoid` |" in summary
    assert "Runs without gradmon scalars: `matrix_product/scaled`." in summary


@pytest.fixture(scope="module")
def trained_logdir(tmp_path_factory) -> Path:
    """One real, short run of the deep sigmoid MLP with every gradmon monitor of its config."""
    from experiments.__main__ import cli_main

    logdir = tmp_path_factory.mktemp("runs")
    config = Path(__file__).resolve().parent.parent / "configs" / "vanishing_sigmoid.yaml"
    cli_main(
        [
            "fit",
            f"--config={config}",
            f"--trainer.logger.init_args.save_dir={logdir}",
            "--trainer.max_steps=12",
            "--trainer.log_every_n_steps=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    return logdir


def test_report_command_writes_valid_pngs_and_summary_from_a_real_run(trained_logdir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(trained_logdir), "--out", str(out)]) == 0
    assert "wrote 3 figures" in capsys.readouterr().out
    for name in ("grad_norm_heatmap", "grad_norm_curves", "gradient_flow"):
        assert_valid_png(out / "vanishing" / "sigmoid" / f"{name}.png")
    summary = (out / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| `vanishing/sigmoid` |"))
    vanishing = row.split("|")[4].strip()
    assert vanishing.split()[0].isdigit() and vanishing != "0", row  # 16 sigmoid layers: flagged within 12 steps
    assert "(vanishing/sigmoid/grad_norm_heatmap.png)" in summary


def test_console_script_runs_report_with_its_default_out_dir(trained_logdir):
    script = Path(sys.executable).with_name("gradmon")
    if not script.exists():
        pytest.skip("the gradmon console script is not installed in this environment")
    done = subprocess.run([str(script), "report", str(trained_logdir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (trained_logdir / "report" / "summary.md").is_file()
