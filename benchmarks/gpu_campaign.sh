#!/usr/bin/env bash
# Every GPU figure of issue 19 in one lease: the three real-pretrained suites with all rows (and
# StatsMerging-R's ablation candidates, every row scored on validation beside test), then the engine
# step (merge_speed.py) and the full TA8-size ViT-B/32 merges (end_to_end.py) once the vision and text
# comparisons are done (less contention). On the lent machine, repo root, the asset cache in CACHE
# (the three builders' --prepare-cache outputs):
#   source benchmarks/device_env.sh
#   setsid nohup bash benchmarks/gpu_campaign.sh WORK CACHE >/tmp/campaign.log 2>&1 &
# WORK/real/status and WORK/status say what has finished; results: WORK/real/compare_*/, WORK/engine/.
# The suites may start in two invocations as their assets arrive (carry limits): first
#   STEPS="vision hetero compare_vision compare_hetero" ABLATION=1 bash benchmarks/real_suites/gpu_real_suites.sh WORK/real CACHE
# then this script with STEPS="text compare_text" (it waits for both comparisons before the engine figures).
# benchmarks/pack_campaign.sh WORK OUT packs what has finished (no weights, no suite data) at any time.
set -u
W=$(realpath -m "$1"); CACHE=$(realpath -m "$2")
mkdir -p "$W/engine"
here=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "$(date +%T) start" >>"$W/status"
ABLATION=1 COMPARE_TIMEOUT=${COMPARE_TIMEOUT:-1300} JOBS_VISION=${JOBS_VISION:-8} JOBS_TEXT=${JOBS_TEXT:-6} \
  JOBS_HETERO=${JOBS_HETERO:-8} bash "$here/real_suites/gpu_real_suites.sh" "$W/real" "$CACHE" &
until grep -q "compare_vision rc" "$W/real/status" 2>/dev/null && grep -q "compare_text rc" "$W/real/status" 2>/dev/null
do sleep 10; done
python3 "$here/merge_speed.py" --model b32 --experts 8 --batch 16 --device cuda:0 --ours fp32,bf16 --host none \
  --steps 20 --no-check-stats --json "$W/engine/merge_speed_b32.json" >"$W/engine/merge_speed.log" 2>&1
echo "$(date +%T) merge_speed rc=$?" >>"$W/status"
python3 "$here/end_to_end.py" --out /tmp/e2e --model b32 --experts 8 --fit-images 1600 \
  --variants default,fp32,residual --json "$W/engine/e2e_b32.json" >"$W/engine/e2e.log" 2>&1
echo "$(date +%T) end_to_end rc=$?" >>"$W/status"
wait
echo "$(date +%T) done" >>"$W/status"
