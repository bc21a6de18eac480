"""The peers benchmark (``python -m experiments.peers``) on its smallest model: every variant trains, and the table
gives each one's median step, its spread, its ratio to no monitoring and what it reports."""

from __future__ import annotations

import re

import pytest

from experiments import peers


@pytest.mark.slow  # trains every peer variant
def test_the_peers_table_times_every_variant_side_by_side() -> None:
    lines = peers.main(["--models", "mlp", "--repeats", "1", "--steps", str(peers.WARMUP + 4)])
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and " ms |" in line}
    expected = {v.name for v in peers.VARIANTS if not v.wandb or peers.wandb_available()}
    assert set(rows) == expected
    assert re.search(r"\| none \| [\d.]+ ms \| [\d.]+ to [\d.]+ ms \| 1\.000 \|", rows["none"])
    for name, row in rows.items():
        ratio = float(row.split("|")[4])
        assert ratio > 0, name
    assert "health flags" in rows["gradmon"] and "total norm only" in rows["total norm"]
