#!/usr/bin/env bash
# GPU checks, in one call on a machine with one CUDA GPU, from a fresh checkout (under 5 minutes):
#   bash scripts/gpu_check.sh [OUTDIR]
# 1. installs what is missing (the project itself, editable; from PyPI, or from wheels in .whl/ when offline),
# 2. runs the tests marked for CUDA (tests/test_cuda.py: gradmon's hooks under torch.cuda.set_sync_debug_mode("error"),
#    the sync-free skip, 16-mixed with a GradScaler and bf16-mixed, GradCheck's CUDA RNG fork, WeightInit on the
#    generator's device, FSDPStrategy and ModelParallelStrategy on one device),
# 3. trains every experiment config for a few steps on accelerator=gpu,
# 4. runs the overhead benchmark on the GPU (20x64, 4x512 and a large MLP), and gradmon beside its peers on a
#    GPT-2-small-shaped decoder (python -m experiments.peers),
# and prints a short table. Everything it prints also goes to OUTDIR (default: gpu_check_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__)" \
  || exit 1

# The project, without touching the preinstalled torch: editable, no dependencies (they are checked just after).
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"lightning": "lightning", "tensorboard": "tensorboard", "matplotlib": "matplotlib", "sklearn": "scikit-learn",
        "jsonargparse": "jsonargparse[signatures]", "pytest": "pytest", "hypothesis": "hypothesis"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "installing: $missing"
  if [ -d .whl ]; then "$PY" -m pip install -q --no-index --find-links .whl $missing
  else "$PY" -m pip install -q $missing; fi
fi

declare -A RESULT
run() {  # name, command...
  local name=$1; shift
  local start=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then RESULT[$name]="pass ($((SECONDS - start)) s)"; else RESULT[$name]="FAIL ($((SECONDS - start)) s, see $OUT/$name.log)"; fi
  tail -n 3 "$OUT/$name.log"
}

run cuda_tests "$PY" -m pytest -q -m cuda tests/test_cuda.py tests/test_activation_monitor.py -p no:cacheprovider
run experiments "$PY" - <<'PYEOF'
from pathlib import Path
import tempfile
from experiments.cli import cli_main
configs = sorted(p.stem for p in Path("configs").glob("*.yaml") if p.stem != "base")
with tempfile.TemporaryDirectory() as logdir:
    for config in configs:
        cli = cli_main(["fit", f"--config=configs/{config}.yaml", "--trainer.accelerator=gpu", "--trainer.devices=1",
                        "--trainer.max_epochs=1", "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=1",
                        f"--trainer.logger.init_args.save_dir={logdir}", "--trainer.enable_progress_bar=false"])
        print(f"{config}: {cli.trainer.global_step} steps on {cli.trainer.strategy.root_device}")
PYEOF
run benchmark "$PY" -m experiments.benchmark --device cuda --repeats 5
# gradmon beside its peers on the GPT-2-small-shaped decoder (bf16-mixed): the table docs/performance.md shows.
run peers "$PY" -m experiments.peers --device cuda --models gpt --repeats 3 --steps 40

echo
echo "| check | result |"
echo "|---|---|"
for name in cuda_tests experiments benchmark peers; do echo "| $name | ${RESULT[$name]} |"; done
echo
echo "benchmark (GPU: $(cat "$OUT/gpu.txt")):"
grep -A20 "^model" "$OUT/benchmark.log" || true
echo
grep -A12 "^device:" "$OUT/peers.log" || true
[[ "${RESULT[*]}" != *FAIL* ]]
