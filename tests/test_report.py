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
from gradmon.health import HealthRules
from gradmon.report import (
    event_files,
    find_metric,
    find_runs,
    health_summary,
    layer_matrix,
    load_run,
    load_runs,
    summary_markdown,
    write_report,
)
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


def health(vanishing: float = 0.0) -> dict[str, float]:
    return {"grad_health/vanishing": vanishing, "grad_health/exploding": 0.0, "grad_health/nonfinite": 0.0}


def table(summary: str) -> dict[str, dict[str, str]]:
    """``summary.md``'s table: run name -> column header -> cell."""
    lines = [line for line in summary.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0].strip("`"): dict(zip(header, row)) for row in rows}


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


def test_layers_of_two_optimizers_logged_at_alternate_steps_share_a_column_per_logging_round(tmp_path):
    # A GAN: the discriminator (D) steps at even global steps, the generator (G) at odd ones; the heatmap would
    # otherwise grey every layer every other column.
    steps = {0: grad_norms({"D.0": 10.0}), 1: grad_norms({"G.0": 100.0}), 10: grad_norms({"D.0": 1e3}),
             11: grad_norms({"G.0": 1e4}), 20: grad_norms({"D.0": float("nan")}), 21: grad_norms({"G.0": 1e5})}
    run = load_run(write_run(tmp_path / "gan", steps))
    layers, logged, values = layer_matrix(run, rounds=True)
    assert layers == ["D.0", "G.0"] and logged.tolist() == [0, 10, 20]
    np.testing.assert_allclose(values, [[1.0, 3.0, np.nan], [2.0, 4.0, 5.0]])
    # Without rounds, a column per step.
    assert layer_matrix(run)[1].tolist() == [0, 1, 10, 11, 20, 21]
    # A layer logged twice in a row starts a new round each time.
    run = load_run(write_run(tmp_path / "one", {0: grad_norms({"a": 1.0, "b": 1.0}), 1: grad_norms({"a": 1.0})}))
    assert layer_matrix(run, rounds=True)[1].tolist() == [0, 1]


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


def write_rerun(run_dir: Path) -> tuple[Path, Path]:
    """Two runs logged into one directory, as a rerun with the same ``version`` does: a 16-layer net for 230 steps
    flagged vanishing from step 9, then a 20-layer net for 23 steps never flagged. The older file is renamed to sort
    after the newer one by name, so only the files' wall times tell which is the latest."""
    old_layers = [f"net.{2 * i}" for i in range(16)]
    new_layers = [f"net.{2 * i}" for i in range(20)]
    write_run(
        run_dir, {s: {**grad_norms(dict.fromkeys(old_layers, 1e-3)), **health(16.0 * (s >= 9))} for s in range(230)}
    )
    (old,) = run_dir.glob("events.out.tfevents.*")
    old = old.rename(run_dir / "events.out.tfevents.9999999999.zz.1.0")
    write_run(run_dir, {s: {**grad_norms(dict.fromkeys(new_layers, 0.1)), **health()} for s in range(23)})
    (new,) = set(run_dir.glob("events.out.tfevents.*")) - {old}
    new = new.rename(run_dir / "events.out.tfevents.0000000001.aa.1.0")
    return old, new


def test_a_rerun_into_the_same_directory_is_not_merged_the_latest_event_file_is_read(tmp_path):
    old, new = write_rerun(tmp_path / "vanishing" / "sigmoid")
    assert event_files(tmp_path / "vanishing" / "sigmoid") == [old, new]  # by wall time, not by name

    run = load_run(tmp_path / "vanishing" / "sigmoid", tmp_path)

    assert (run.event_file, run.ignored_event_files) == (new, [old])
    layers, steps, _ = layer_matrix(run)
    assert len(layers) == 20 and steps.tolist() == list(range(23))  # not a 16- and a 20-layer net stitched
    summary = health_summary(run)
    assert summary.last_step == 22
    assert summary.flagged_steps["vanishing"] == 0  # the older run's 221 flagged steps are not added in
    text = summary_markdown([run])
    assert table(text)["vanishing/sigmoid"]["last monitored step"] == "22"
    note = next(line for line in text.splitlines() if line.startswith("- `vanishing/sigmoid` holds 2 event files"))
    assert f"reported only the latest, `{new.name}`; ignored: `{old.name}`" in note


def test_cli_says_on_stdout_which_event_file_it_read_when_a_directory_holds_several(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "exp" / "v0"
    write_run(run_dir, {0: health(3.0)})
    write_run(run_dir, {0: health(), 1: health()})
    older, newer = event_files(run_dir)

    assert main(["report", str(tmp_path / "runs")]) == 0

    stdout = capsys.readouterr().out
    assert "gradmon report: note: `exp/v0` holds 2 event files" in stdout
    assert f"reported only the latest, `{newer.name}`; ignored: `{older.name}`" in stdout
    summary = (tmp_path / "runs" / "report" / "summary.md").read_text()
    assert table(summary)["exp/v0"]["vanishing"] == "0"
    assert f"ignored: `{older.name}`" in summary


def test_one_event_file_per_directory_gets_no_note(tmp_path):
    write_run(tmp_path / "exp" / "v0", {0: health()})
    assert "event files" not in summary_markdown(load_runs(tmp_path))


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (["val/acc"], "val/acc"),
        (["val_acc"], "val_acc"),
        (["valid/accuracy"], "valid/accuracy"),
        (["Val_Acc"], "Val_Acc"),
        (["val/acc_top5", "val/acc", "hp/val_acc"], "val/acc"),  # the shortest of those that match
        (["train/acc", "hp/val_acc", "val/loss"], "val/loss"),  # no accuracy: the validation loss
        (["train/loss", "val/perplexity", "val/loss_lm"], "val/loss_lm"),
        (["train/loss", "val/perplexity"], "val/perplexity"),  # else any validation scalar
        (["train/acc", "hp/val_acc"], None),
    ],
)
def test_the_default_metric_is_a_val_acc_like_tag_else_a_val_loss_else_any_val_scalar(tmp_path, tags, expected):
    run = load_run(write_run(tmp_path / "run", {0: dict.fromkeys(tags, 0.5)}))
    assert find_metric(run) == expected


def test_summary_shows_the_last_value_of_the_metric_given_or_found(tmp_path):
    write_run(tmp_path / "a", {0: {**health(), "valid/accuracy": 0.25, "test/f1": 0.5}, 9: {"valid/accuracy": 0.75}})
    write_run(tmp_path / "b", {0: {**health(), "val_acc": 0.5}})
    write_run(tmp_path / "c", {0: health()})
    runs = load_runs(tmp_path)

    found = table(summary_markdown(runs))
    assert [found[r]["val accuracy (last)"] for r in "abc"] == ["0.750 (`valid/accuracy`)", "0.500 (`val_acc`)", "-"]
    given = table(summary_markdown(runs, metric="test/f1"))
    assert [given[r]["test/f1 (last)"] for r in "abc"] == ["0.500", "-", "-"]
    assert table(summary_markdown(runs[:1]))["a"]["valid/accuracy (last)"] == "0.750"  # one tag: it heads the column
    assert "(last)" not in summary_markdown(runs[2:])  # no run has one: no column


def test_without_an_accuracy_the_column_says_which_validation_scalar_it_shows(tmp_path):
    write_run(tmp_path / "lm", {0: {**health(), "val/loss": 3.5}, 9: {"val/loss": 2.25}})
    write_run(tmp_path / "clf", {0: {**health(), "val/acc": 0.5}})
    runs = load_runs(tmp_path)
    assert table(summary_markdown(runs[1:]))["lm"]["val/loss (last)"] == "2.250"
    mixed = table(summary_markdown(runs))
    assert mixed["lm"]["validation metric (last)"] == "2.250 (`val/loss`)"
    assert mixed["clf"]["validation metric (last)"] == "0.500 (`val/acc`)"


def test_a_metric_no_run_logged_is_a_note_and_an_empty_one_an_error(tmp_path, capsys):
    write_run(tmp_path / "runs" / "a", {0: {**health(), "val/acc": 0.5}})
    notes: list[str] = []
    write_report(tmp_path / "runs", tmp_path / "out", metric="val/accuracy", note=notes.append)
    assert notes == ["`metric='val/accuracy'`: no run logged this tag."]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert table(summary)["a"]["val/accuracy (last)"] == "-"
    assert "- `metric='val/accuracy'`: no run logged this tag." in summary

    assert main(["report", str(tmp_path / "runs"), "--metric", "val/acc"]) == 0
    assert table((tmp_path / "runs" / "report" / "summary.md").read_text())["a"]["val/acc (last)"] == "0.500"
    assert "note" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="`metric=''` is not valid"):
        write_report(tmp_path / "runs", tmp_path / "out", metric="")
    assert main(["report", str(tmp_path / "runs"), "--metric", ""]) == 2
    assert "`--metric ''` is not valid" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_logdir(tmp_path_factory) -> Path:
    """One real, short run of the deep sigmoid MLP with every gradmon monitor of its config."""
    from experiments.cli import fit_config

    logdir = tmp_path_factory.mktemp("runs")
    fit_config("vanishing_sigmoid", logdir, "--trainer.max_steps=12", "--trainer.log_every_n_steps=2")
    return logdir


def test_report_command_writes_valid_pngs_and_summary_from_a_real_run(trained_logdir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(trained_logdir), "--out", str(out)]) == 0
    assert "wrote 5 figures" in capsys.readouterr().out
    for name in ("grad_norm_heatmap", "grad_norm_curves", "gradient_flow", "activation_rms_heatmap",
                 "dead_or_saturated_heatmap"):
        assert_valid_png(out / "vanishing" / "sigmoid" / f"{name}.png")
    summary = (out / "summary.md").read_text()
    row = table(summary)["vanishing/sigmoid"]
    assert row["vanishing"].split()[0].isdigit() and row["vanishing"] != "0", summary  # flagged within 12 steps
    assert row["diagnosis"] == "saturating activation (step 0)"  # the verdict, with the step it was found at
    assert "(vanishing/sigmoid/grad_norm_heatmap.png)" in summary
    assert "(vanishing/sigmoid/dead_or_saturated_heatmap.png)" in summary
    section = summary.split("## Diagnosis", 1)[1]
    assert "### `vanishing/sigmoid`" in section
    assert "**Verdict** (found at step 0, from the signal measured through the layers): **saturating activation**" in (
        section)
    assert "- **gradient shrinks on its way back through depth** at step 0" in section
    assert "Likely cause: **saturating activation**: Sigmoid's slope is at most 0.25" in section


def diagnosis_text(condition: str, cause: str, step: int) -> str:
    return (f"**{condition}** at step {step}, in net.0 to net.6 (4 layers).  \nLikely cause: **{cause}**: why.  \n"
            "Try: this.")


def test_the_summary_has_a_diagnosis_column_and_section_from_the_diagnosis_texts(tmp_path):
    modules = {f"activation_rms/net.{i}": 1.0 for i in range(4)}
    found = tmp_path / "runs" / "found"
    with SummaryWriter(str(found)) as writer:  # one writer: a second event file would be a rerun
        for step in range(6):
            write_scalars(writer, {**grad_norms({"net.0": 1.0}), **modules}, step)
        writer.add_text("diagnosis/forward_decay", diagnosis_text("forward signal shrinks", "init gain mismatch", 0), 0)
        writer.add_text("diagnosis/forward_decay", "**forward signal shrinks**: no longer found.", 4)
        writer.add_text("diagnosis/dead_units", diagnosis_text("dead units", "dead ReLUs", 2), 2)
        writer.add_text("diagnosis/dead_units", diagnosis_text("dead units", "dead ReLUs", 3), 3)
    write_run(tmp_path / "runs" / "healthy", {s: {**grad_norms({"net.0": 1.0}), **modules} for s in range(6)})
    write_run(tmp_path / "runs" / "unwatched", {s: grad_norms({"net.0": 1.0}) for s in range(6)})

    run = load_run(found)
    assert [step for step, _ in run.diagnosis()["dead_units"]] == [2, 3]
    assert run.modules == [f"net.{i}" for i in range(4)]
    write_report(tmp_path / "runs", tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text()
    rows = table(summary)
    assert rows["found"]["diagnosis"] == "init gain mismatch, dead ReLUs"
    assert (rows["healthy"]["diagnosis"], rows["unwatched"]["diagnosis"]) == ("none", "-")
    section = summary.split("## Diagnosis", 1)[1].split("## Notes")[0].split("## Figures")[0]
    found_part = section.split("### `found`", 1)[1].split("###")[0]
    assert found_part.index("init gain mismatch") < found_part.index("dead ReLUs")  # by the step first found
    assert "- **forward signal shrinks** at step 0" in found_part and "No longer found from step 4." in found_part
    assert "dead units** at step 3" in found_part and "at step 2" not in found_part  # the latest of each condition
    assert "  \n  Likely cause: **dead ReLUs**" in found_part  # the finding's lines stay inside its list item
    assert "### `healthy`\n\nNo finding." in section and "`unwatched`" not in section


def test_activation_heatmaps_are_drawn_for_the_statistics_a_run_logged(tmp_path):
    values = {}
    for i in range(4):
        values.update({f"activation_rms/net.{i}": 10.0**-i, f"activation_rms_log10/net.{i}": -float(i),
                       f"activation_grad_rms/net.{i}": 1e-3, f"activation_grad_rms_log10/net.{i}": -3.0})
    values.update({"dead_fraction/net.1": 0.5, "dead_fraction/net.3": 1.0})
    write_run(tmp_path / "runs" / "relu", {s: {**grad_norms({"net.0": 1.0}), **values} for s in range(0, 10, 2)})
    written = write_report(tmp_path / "runs", tmp_path / "out")
    assert sorted(p.name for p in written if "heatmap" in p.name) == [
        "activation_rms_heatmap.png", "dead_or_saturated_heatmap.png", "grad_norm_heatmap.png",
    ]
    layers, steps, dead = layer_matrix(load_run(tmp_path / "runs" / "relu"), "dead_fraction/", "activation_rms/")
    assert layers == ["net.1", "net.3"] and steps.tolist() == [0, 2, 4, 6, 8]
    assert dead[:, 0].tolist() == [0.5, 1.0]


@pytest.mark.slow  # a fresh interpreter
def test_console_script_runs_report_with_its_default_out_dir(tmp_path):
    script = Path(sys.executable).with_name("gradmon")
    if not script.exists():
        pytest.skip("the gradmon console script is not installed in this environment")
    write_run(tmp_path / "exp" / "v0", {0: {**health(), "val/acc": 0.5}})
    done = subprocess.run([str(script), "report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert table((tmp_path / "report" / "summary.md").read_text())["exp/v0"]["val/acc (last)"] == "0.500"


def test_a_run_logged_through_a_logger_prefix_is_read_as_gradmons_tags(tmp_path):
    import lightning.pytorch as pl
    from helpers import MLP, make_loader

    from gradmon import GradHealthMonitor, GradNormMonitor

    logger = pl.loggers.TensorBoardLogger(tmp_path / "runs", name="prefixed", version=0, prefix="x")
    pl.Trainer(accelerator="cpu", max_steps=6, log_every_n_steps=2, logger=logger, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False,
               callbacks=[GradNormMonitor(),
                          GradHealthMonitor(HealthRules(vanishing_threshold=100.0, vanishing_patience=1),
                                            on_vanishing="ignore")],
               ).fit(MLP(depth=2), make_loader(16, 6))
    run = load_run(tmp_path / "runs" / "prefixed" / "version_0")
    assert "x-grad_norm/net.0" not in run.scalars
    assert run.layers() == ["net.0", "net.2", "net.4"]
    assert sorted(run.scalars["grad_norm/net.0"].steps.tolist()) == [0, 2, 4]
    summary = health_summary(run)
    assert summary.flagged_steps["vanishing"] == 6 and summary.first_flagged["vanishing"] == 0  # below 100 always
    paths = write_report(tmp_path / "runs", tmp_path / "report")
    assert {p.name for p in paths} >= {"grad_norm_heatmap.png", "grad_norm_curves.png", "gradient_flow.png"}


def test_the_summary_shows_fp16_overflow_steps_only_when_a_run_had_a_grad_scaler(tmp_path):
    health = {"grad_health/vanishing": 0.0, "grad_health/exploding": 0.0, "grad_health/nonfinite": 0.0,
              "grad_health/skipped_steps": 0.0, "grad_norm/net.0": 1.0}
    write_run(tmp_path / "runs" / "fp16", {0: {**health, "grad_health/amp_overflow_steps": 1.0},
                                           5: {**health, "grad_health/amp_overflow_steps": 4.0}})
    write_run(tmp_path / "runs" / "fp32", {0: health, 5: health})
    rows = table(summary_markdown(load_runs(tmp_path / "runs")))
    assert rows["fp16"]["fp16 overflow steps (not flagged)"] == "4"  # the cumulative count's last value
    assert rows["fp32"]["fp16 overflow steps (not flagged)"] == "-"
    assert health_summary(load_run(tmp_path / "runs" / "fp16")).amp_overflow_steps == 4
    write_run(tmp_path / "plain" / "fp32", {0: health})
    assert "overflow" not in summary_markdown(load_runs(tmp_path / "plain"))
