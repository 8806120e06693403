#!/usr/bin/env bash
# The GPU figures issue #9 still needs, in one command (at most 8 minutes on one H200): the forward
# layouts checked against the full logits on the device (bench/label_logps_check.py, 342M shape,
# bf16), then our `train` step against TRL's DPOTrainer (bench/bench_vs_trl.py) at 342M with
# shared prompts on the toy pairs, with `auto` (per batch: one padded forward, packed or shared
# prompts) on long PKU-SafeRLHF-shaped pairs (max_length 512), and at 110M with shared prompts.
# Results go to $OUT (default ./bench-out), each as soon as it is measured, with each part's
# wall time in $OUT/times.txt. A part that fails or runs past its limit is reported and the
# next one still runs: one bad measurement does not cost the others their device time.
#
#   bash bench/gpu_layouts.sh
#
# TRL and datasets come from wheels in .whl/ where the machine has no index (see
# docs/benchmarks.md); the check itself needs neither.
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
failed=0
part() {  # part NAME LIMIT_S COMMAND...: run one measurement, log its wall time and status
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name rc=$rc wall_s=$((SECONDS - t0))" | tee -a "$out/times.txt"
    [ "$rc" -eq 0 ] || failed=1
}
if ! python3 -c "import trl, datasets" 2>/dev/null; then
    python3 -m pip install -q --no-index --find-links .whl trl datasets \
        || python3 -m pip install -q --no-index --no-deps .whl/*.whl
fi
part layout_check 90 python3 bench/label_logps_check.py
part shared_340m 120 python3 bench/bench_vs_trl.py --config 340m --layout shared_prompts \
    --json "$out/shared_340m.json"
part pku_auto_340m 180 python3 bench/bench_vs_trl.py --config 340m --data pku --layout auto \
    --json "$out/pku_auto_340m.json"
part shared_110m 90 python3 bench/bench_vs_trl.py --config 110m --layout shared_prompts \
    --no-memory --json "$out/shared_110m.json"
exit $failed
