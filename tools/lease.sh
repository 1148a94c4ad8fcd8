#!/usr/bin/env bash
# The device side of a lease (prepared here by `make lease`, which prints the exact call):
#   bash tools/lease.sh BUDGET_MIN REV DIRTY [--probe "COMMAND"] [owed.py run options: --chapters a,b --profile P]
# run from the root of the copied checkout, with .bundle/ carried and $OUT an empty folder whose files come back.
# 1. installs the Jupyter wheels of .bundle/whl (no index, no dependencies) into /tmp/site and registers the kernel;
# 2. optionally runs a probe command (at most 2 minutes; e.g. the engine benchmark, whose record the queue exports);
# 3. runs the owed queue (tools/owed.py run) with what is left of BUDGET_MIN minutes, exporting into $OUT after
#    every chapter and every minute, so that a command killed at its limit still returns all finished work.
# The lease ledger (setup, probe, training and export minutes) is in $OUT/manifest.json under "ledger".
set -uo pipefail
t0=$(date +%s.%N)
if [ $# -lt 3 ]; then
  echo "usage: bash tools/lease.sh BUDGET_MIN REV DIRTY [--probe CMD] [owed.py run options]" >&2; exit 2
fi
budget_min=$1 rev=$2 dirty=$3
shift 3
probe=""
if [ "${1:-}" = "--probe" ]; then probe=$2; shift 2; fi
: "${OUT:?lease.sh: set OUT to the (empty) folder whose files come back}"
[ -d .bundle/whl ] || { echo "lease.sh: no .bundle/whl here: run make lease first and carry .bundle" >&2; exit 2; }
elapsed() { python3 -c "import time; print(f'{time.time() - $t0:.1f}')"; }

site=/tmp/kdbook-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .bundle/whl/*.whl \
  || { echo "lease.sh: installing the wheels failed" >&2; exit 3; }
export PYTHONPATH="$site:$PWD" KDBOOK_DATASETS="$PWD/.bundle/datasets" PYTHONUNBUFFERED=1
export KDBOOK_GIT_REV="$rev" KDBOOK_GIT_DIRTY="$dirty" KDBOOK_LEASE_MIN="$budget_min"
python3 -m ipykernel install --user --name kdbook --display-name kdbook >/dev/null \
  || { echo "lease.sh: registering the kdbook kernel failed" >&2; exit 3; }
export KDBOOK_LEASE_SETUP_S=$(elapsed)
echo "lease: setup $KDBOOK_LEASE_SETUP_S s (wheels, kernel); $(python3 -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "no cuda")')"

if [ -n "$probe" ]; then
  p0=$(date +%s.%N)
  timeout -k 5 120 bash -c "$probe" 2>&1 | sed 's/^/[probe] /'
  echo "lease: probe exit ${PIPESTATUS[0]}"
  export KDBOOK_LEASE_PROBE_S=$(python3 -c "import time; print(f'{time.time() - $p0:.1f}')")
fi

left_min=$(python3 -c "print(f'{$budget_min - $(elapsed) / 60:.3f}')")
echo "lease: $left_min of $budget_min min left for the owed queue"
exec python3 tools/owed.py run --budget-min "$left_min" --out "$OUT" "$@"
