"""GradNormMonitor and GradHealthMonitor under real 2-process DDP and FSDP2 (ModelParallelStrategy) runs on CPU
(gloo), against a single-process reference on the same global batches."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_runs import PER_DEVICE_BATCH, STEPS
from helpers import MLP, PlantNaN, fit, logdir, mlp_layers, read_scalars

from gradmon import GradHealthMonitor, GradNormMonitor
from gradmon.init import initialize

pytestmark = pytest.mark.slow  # every test starts 2 processes

HERE = Path(__file__).parent
LAYERS = mlp_layers(depth=3)


def launch(scenario: str, out: Path, timeout: float = 240) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "distributed_runs.py"), scenario, str(out)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def reference(tmp_path: Path, plant_nan_at: int | None = None):
    """Single process, batches twice the per-device size: the global batches of the 2-rank runs."""
    torch.manual_seed(0)
    model = MLP()
    callbacks = [GradNormMonitor(log_every_n_steps=1), GradHealthMonitor(on_nonfinite="skip")]
    if plant_nan_at is not None:
        callbacks.append(PlantNaN(plant_nan_at, element=(0, 0)))
    fit(model, callbacks, steps=STEPS, tmp_path=tmp_path, batch_size=2 * PER_DEVICE_BATCH)
    return read_scalars(logdir(tmp_path)), model.state_dict(), callbacks[1]


def assert_norms_match(got: dict, want: dict, steps: range) -> None:
    for prefix in ("grad_norm", "weight_norm", "update_ratio"):
        for layer in LAYERS:
            tag = f"{prefix}/{layer}"
            for step in steps:
                assert got[tag][step] == pytest.approx(want[tag][step], rel=1e-4), (tag, step)
    for step in steps:
        assert got["grad_norm/total"][step] == pytest.approx(want["grad_norm/total"][step], rel=1e-4)


def test_ddp_norms_equal_single_process_norms(tmp_path: Path) -> None:
    launch("ddp_norms", tmp_path / "ddp")
    got = read_scalars(logdir(tmp_path / "ddp"))
    want, want_weights, _ = reference(tmp_path / "ref")
    assert_norms_match(got, want, range(STEPS))
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    for name, w in want_weights.items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])
        torch.testing.assert_close(ranks[0]["weights"][name], w, rtol=1e-5, atol=1e-6)


def test_fsdp_sharded_norms_are_full_tensor_norms_and_ranks_skip_together(tmp_path: Path) -> None:
    launch("fsdp_norms", tmp_path / "fsdp")
    got = read_scalars(logdir(tmp_path / "fsdp"))
    want, want_weights, want_health = reference(tmp_path / "ref", plant_nan_at=2)
    # Steps 0, 1 and 3 are finite; at step 2 rank 1's shard of net.2 held a NaN: flagged, named, skipped on both ranks.
    assert_norms_match(got, want, range(2))
    assert math.isnan(got["grad_norm/net.2"][2])
    for layer in LAYERS:
        assert got[f"grad_norm/{layer}"][3] == pytest.approx(want[f"grad_norm/{layer}"][3], rel=1e-4)
    assert want_health.events[0].step == 2 and want_health.events[0].layer == "net.2"
    for r in (0, 1):
        result = torch.load(tmp_path / "fsdp" / f"rank{r}.pt")
        assert result["skipped_steps"] == 1
        assert result["events"] == [(2, "net.2", "nonfinite")]
        for name, w in want_weights.items():
            assert torch.isfinite(result["weights"][name]).all()
            torch.testing.assert_close(result["weights"][name], w, rtol=1e-5, atol=1e-6)
    assert got["grad_health/nonfinite"][2] == 1.0
    assert got["grad_health/skipped_steps"][2] == 1.0


def test_ddp_ranks_take_the_same_decision_when_only_one_rank_flags(tmp_path: Path) -> None:
    # Rank 1 alone flags step 0 and asks to stop; rank 0 must stop with it (a lone stop would hang rank 0).
    launch("ddp_disagree", tmp_path / "ddp", timeout=180)
    steps = [torch.load(tmp_path / "ddp" / f"rank{r}.pt")["global_step"] for r in (0, 1)]
    assert steps == [1, 1]


def test_weight_init_on_fsdp_shards_gives_the_single_process_weights(tmp_path: Path) -> None:
    launch("fsdp_init", tmp_path / "fsdp")
    torch.manual_seed(0)
    reference = MLP()
    initialize(reference, "kaiming_normal", nonlinearity="relu", generator=torch.Generator().manual_seed(0))
    initialize(reference, "orthogonal", include=r"^net\.2$", generator=torch.Generator().manual_seed(1))
    for r in (0, 1):
        initial = torch.load(tmp_path / "fsdp" / f"rank{r}.pt")["initial_weights"]
        for name, w in reference.state_dict().items():
            torch.testing.assert_close(initial[name], w, rtol=0, atol=0, msg=name)
    w2 = initial["net.2.weight"]
    torch.testing.assert_close(w2 @ w2.T, torch.eye(w2.shape[0]), rtol=0, atol=1e-5)


def test_sync_free_skip_is_taken_by_every_rank_when_one_rank_finds_a_nan(tmp_path: Path) -> None:
    launch("ddp_sync_free", tmp_path / "ddp")
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    assert [r["global_step"] for r in ranks] == [STEPS, STEPS]
    assert [r["skipped_steps"] for r in ranks] == [1, 1]
    # Rank 0's gradients were finite: it records rank 1's event, attributed to rank 1.
    assert [r["events"] for r in ranks] == [[(2, "net.2", "nonfinite")]] * 2
    assert [r["ranks"] for r in ranks] == [[1], [1]]
    for name, weight in ranks[0]["weights"].items():
        assert torch.isfinite(weight).all()
        assert torch.equal(weight, ranks[1]["weights"][name])  # the replicas did not diverge


@pytest.mark.parametrize("sync_free", [False, True], ids=["default", "sync_free"])
def test_a_nan_on_one_rank_under_warn_is_warned_and_logged_by_rank_0_naming_the_rank(tmp_path: Path, sync_free) -> None:
    # The NaN is written into rank 1's gradient after DDP's all-reduce: rank 0's own gradients are finite.
    launch("ddp_local_warn" + ("_sync_free" if sync_free else ""), tmp_path / "ddp")
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    assert [r["global_step"] for r in ranks] == [STEPS, STEPS]
    assert [r["events"][0] for r in ranks] == [(2, "net.2", "nonfinite")] * 2
    assert [r["ranks"][0] for r in ranks] == [1, 1]
    step2 = [w for w in ranks[0]["warnings"] if "at step 2" in w]
    assert len(step2) == 1
    assert step2[0].startswith("gradmon: non-finite gradients at step 2 on rank 1, first in layer net.2")
    got = read_scalars(logdir(tmp_path / "ddp"))
    assert got["grad_health/nonfinite"][2] == 1.0
    assert got["grad_health_flag/net.2"][2] == 3.0


@pytest.mark.parametrize("action", ["stop", "raise"])
@pytest.mark.parametrize("sync_free", [False, True], ids=["default", "sync_free"])
def test_stop_and_raise_on_a_nan_on_one_rank_are_taken_by_every_rank(tmp_path: Path, action, sync_free) -> None:
    # Before the findings were shared, sync-free mode raised (or stopped) on rank 1 alone, and rank 0 died in its
    # next collective ("Connection closed by peer"; a hang under NCCL).
    launch(f"ddp_local_{action}" + ("_sync_free" if sync_free else ""), tmp_path / "ddp")
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    late = 1 if sync_free else 0  # sync-free mode judges a step's numbers at the next step
    if action == "raise":
        assert [r["global_step"] for r in ranks] == [2 + late] * 2
        assert ranks[0]["error"].startswith("gradmon: non-finite gradients at step 2 on rank 1, first in layer net.2")
        assert ranks[1]["error"].startswith("gradmon: non-finite gradients at step 2 on rank 1, first in layer net.2")
    else:
        assert [r["global_step"] for r in ranks] == [3 + late] * 2
        assert [r["error"] for r in ranks] == [None, None]


@pytest.mark.parametrize("scenario", ["ddp_one_rank", "ddp_mismatch"])
def test_gradmon_callbacks_that_differ_between_ranks_are_an_error_at_setup_not_a_hang(tmp_path: Path, scenario) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # Without the check both ranks blocked in gloo until its 30-minute timeout.
    subprocess.run([sys.executable, str(HERE / "distributed_runs.py"), scenario, str(out)], capture_output=True,
                   text=True, timeout=120, env=env, cwd=HERE.parent)
    errors = {r: torch.load(out / f"rank{r}.pt")["error"] for r in (0, 1) if (out / f"rank{r}.pt").exists()}
    if scenario == "ddp_one_rank":
        assert errors[1] == (
            "RuntimeError: gradmon: rank 1 has the callbacks [GradHealthMonitor(sync_free=False, device_skips=[])], "
            "but rank(s) 0 did not reach gradmon's setup within 5 s: give every rank the same gradmon callbacks (a "
            "callback on some ranks only makes collectives the others never join, and the job hangs)."
        )
    else:
        assert errors[0].startswith("RuntimeError: gradmon: the ranks have different gradmon callbacks (rank 0: "
                                    "[GradHealthMonitor(sync_free=False, device_skips=[]); GradCheck(")
        assert "rank 1: [GradHealthMonitor(sync_free=False, device_skips=[])]" in errors[0]
