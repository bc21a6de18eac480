"""`gradmon report` on what real runs leave behind: a run resumed into the same directory, damaged event files, an
output path that cannot be a directory."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
from helpers import MLP, fit, logdir
from test_report import grad_norms, health, write_run

from gradmon import GradHealthMonitor, GradNormMonitor
from gradmon.cli import main
from gradmon.health import HealthRules
from gradmon.report import event_files, health_summary, load_run

CKPT_STEP = 10


class SaveAt(pl.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == CKPT_STEP:
            trainer.save_checkpoint(self.path)


def monitors():
    # Every step flagged vanishing: the counts show whether both files' steps were read. No images: the damage
    # tests cut the file at half, which must fall among the scalars, not in the end-of-fit figures.
    return [GradNormMonitor(log_every_n_steps=1, images_every_n_logs=None),
            GradHealthMonitor(HealthRules(vanishing_threshold=1e3, exploding_threshold=1e9, vanishing_patience=1),
                              on_vanishing="ignore")]


def test_a_run_resumed_into_the_same_directory_is_reported_whole(tmp_path: Path) -> None:
    ckpt = tmp_path / "at10.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(MLP(), [*monitors(), SaveAt(ckpt)], steps=15, tmp_path=tmp_path, log_every_n_steps=1)
        fit(MLP(), monitors(), steps=25, tmp_path=tmp_path, ckpt_path=ckpt, log_every_n_steps=1)
    first, second = event_files(logdir(tmp_path))
    run = load_run(logdir(tmp_path), tmp_path)
    assert run.merged_event_files == [first] and run.event_file == second and run.ignored_event_files == []
    assert run.scalars["grad_norm/net.0"].steps.tolist() == list(range(25))  # 0-9 from the first file, 10-24 after
    summary = health_summary(run)
    assert (summary.last_step, summary.flagged_steps["vanishing"], summary.first_flagged["vanishing"]) == (24, 25, 0)


def test_where_a_resumed_file_overlaps_the_earlier_one_the_later_file_wins(tmp_path: Path) -> None:
    run_dir = tmp_path / "v"
    write_run(run_dir, {s: {**grad_norms({"a": 1.0}), **health(1.0 * (s == 12))} for s in range(15)})
    (old,) = run_dir.glob("events.out.tfevents.*")
    old.rename(run_dir / "events.out.tfevents.0000000001.a.1.0")
    write_run(run_dir, {s: grad_norms({"a": 2.0}) for s in range(10, 20)})
    run = load_run(run_dir, tmp_path)
    series = run.scalars["grad_norm/a"]
    assert series.steps.tolist() == list(range(20))
    assert series.values.tolist() == [1.0] * 10 + [2.0] * 10
    # Step 12 of the abandoned first run was flagged: the resumed run replaced that step, so it is not counted.
    assert run.scalars["grad_health/vanishing"].steps.tolist() == list(range(10))


@pytest.fixture
def logged(tmp_path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(MLP(), monitors(), steps=30, tmp_path=tmp_path / "logs", log_every_n_steps=1)
    return logdir(tmp_path / "logs")


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage"])
def test_a_damaged_event_file_is_reported_as_damaged_with_how_far_it_was_read(logged: Path, tmp_path, capsys, damage):
    (file,) = event_files(logged)
    data = file.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped":
        data = data[: len(data) // 2] + bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 50]) + data[
            len(data) // 2 + 50 :]
    else:
        data = b"\x07" * 5000
    file.write_bytes(data)
    run = load_run(logged, tmp_path)
    ((damaged, (what, last_step)),) = run.damaged.items()
    assert damaged == file
    if damage == "garbage":
        assert last_step is None and "crc32" in what and run.scalars == {}
    else:
        assert 0 < last_step < 29 and last_step == max(s.steps.max() for s in run.scalars.values())
    assert main(["report", str(tmp_path / "logs"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"gradmon report: warning: damaged event file `{file.name}` in `tb/version_0`" in err
    summary = (tmp_path / "out" / "summary.md").read_text()
    expected = "nothing in it could be read" if damage == "garbage" else f"read up to step {last_step}"
    assert f"damaged event file `{file.name}`" in summary and expected in summary


def test_an_intact_run_exits_0_without_a_damage_note(logged: Path, tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path / "logs"), "--out", str(tmp_path / "out")]) == 0
    assert "damaged" not in capsys.readouterr().err + (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.parametrize("under", ["", "sub"])
def test_an_out_under_a_regular_file_is_a_clear_error(logged: Path, tmp_path, capsys, under) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    out = afile / under if under else afile
    assert main(["report", str(tmp_path / "logs"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"gradmon report: error: `out={str(out)!r}` cannot be a directory: {str(afile)!r} is a "
                           "file; pass a directory to write the report into")
