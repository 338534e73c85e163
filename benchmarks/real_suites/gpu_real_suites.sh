#!/usr/bin/env bash
# The real-pretrained suites' tables in docs/benchmarks.md, on one GPU machine without registry
# access: builds from a carried asset cache (see each builder's --offline), then the comparisons.
#   vision          build_vision.py  (MobileNetV2 ImageNet experts on real images)
#   text            build_text.py    (all-MiniLM-L6-v2 experts on real text)
#   hetero          build_hetero_vision.py: EfficientNet-Lite0 experts for $HETERO_TASKS of the vision suite
#   compare_vision, compare_text, compare_hetero: statsmerging-compare on each (waits for its build)
# Assets: fill a cache where the registries are reachable (each builder's --prepare-cache DIR, about
# 130 MB with MiniLM's 91 MB safetensors, so it travels to the lent machine over more than one call),
# then on the GPU machine, repo root, after `source benchmarks/device_env.sh`:
#   STEPS="vision text hetero compare_vision compare_text compare_hetero" \
#       bash benchmarks/real_suites/gpu_real_suites.sh WORK_DIR CACHE_DIR
# Steps may be started by separate invocations (e.g. the vision build first, the rest once the
# text assets have arrived); WORK_DIR/status has one line per finished step. A compare step waits for
# its suite's build when the same invocation makes it, and otherwise uses the suite already in WORK_DIR
# (e.g. STEPS=compare_vision COMPARE_METHODS=... reruns rows on an earlier build; it rewrites compare_vision/).
# Measured on one H100 (2026-11-23, docs/benchmarks.md): builds 66 s (text), 238 s (vision), 4m50 s
# (hetero: two EfficientNet experts and their distillation); the host's layer-wise AdaMerging is the
# long row (1.2-1.5 steps/s, about 14 min for its 1000 steps on MobileNetV2, 5 min on MiniLM; 10 min on
# one H200 with nine rows beside it, 2026-12-02), so the default row limit is 30 min and the long rows
# are asked for first; everything else takes 0.5-3 min.
# wudi, iso_c, iso_cts, tsv_m: the host's data-free methods with convolutions merged as matrices
# (method/conv_as_matrix.py; not yet timed on a GPU). RegMean++ is not a row here: the host's is CLIP-only
# (statsmerging-compare lists it as not applicable on per-task-head suites).
# A CPU dry run of the whole script (plumbing only: tiny builds, quick rows):
#   DEVICE=cpu BUILD_ARGS=--tiny COMPARE_METHODS=pretrained,individual,simple_average HETERO_METHODS=... \
#       bash benchmarks/real_suites/gpu_real_suites.sh /tmp/rs_dry CACHE_DIR
set -u
W=$(realpath -m "$1"); CACHE=$(realpath -m "$2")
mkdir -p "$W"
STEPS=${STEPS:-vision text hetero compare_vision compare_text compare_hetero}
JOBS=${COMPARE_JOBS:-6}; TIMEOUT=${COMPARE_TIMEOUT:-1800}
HETERO_TASKS=${HETERO_TASKS:-clipart_animals mnist}
ROWS=${COMPARE_METHODS:-adamerging_layer_train,statsmerging_plusplus,samerging,statsmerging_residual,statsmerging_layer,statsmerging_task,pretrained,individual,simple_average,task_arithmetic,ties_merging,wudi,iso_c,iso_cts,tsv_m}
HETERO_ROWS=${HETERO_METHODS:-adamerging_layer_train,samerging,statsmerging_residual,statsmerging_layer,statsmerging_task,pretrained,individual,simple_average,task_arithmetic,ties_merging,wudi,iso_c,iso_cts,tsv_m}
# ABLATION=1: StatsMerging-R's candidate rows (ablation.py) join each comparison, and every row is also
# scored on the validation split (reported apart; the choice reads validation only)
# (ABLATION_CANDIDATES=key,key,...: only those candidates)
ABLATION=${ABLATION:-0}
DEVICE=${DEVICE:-cuda}; BUILD_ARGS=${BUILD_ARGS:-}
COMPARE_ARGS=${COMPARE_ARGS:-}  # more statsmerging-compare arguments for every comparison (e.g. --budget matched)
JOBS_VISION=${JOBS_VISION:-$JOBS}; JOBS_TEXT=${JOBS_TEXT:-$JOBS}; JOBS_HETERO=${JOBS_HETERO:-$JOBS}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
step() { echo "$(date +%T) $*" >>"$W/status"; }
want() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
# a step that needs a build waits for it only when this invocation makes that build (its "built" line
# after this invocation's start); otherwise the suite is expected from an earlier invocation
START=$(cat "$W/status" 2>/dev/null | wc -l)
wait_for() {  # wait_for BUILD_STEP (vision | text | hetero)
  want "$1" || return 0
  until tail -n +$((START + 1)) "$W/status" 2>/dev/null | grep -q "^[0-9:]* built $1"; do sleep 5; done
}
here=$(dirname "$0")

compare() {  # compare NAME SUITE METHODS JOBS [extra args...]
  local name=$1 suite=$2 methods=$3 jobs=$4; shift 4
  local ablation=()
  if [ "$ABLATION" = 1 ]; then
    eval "ablation=($(python3 "$here/ablation.py" --add-args ${ABLATION_CANDIDATES:+--only "$ABLATION_CANDIDATES"}))"
    ablation+=(--extra-overrides "taskpool.extra_splits=[validation]")
  fi
  python3 -m fusion_bench_statsmerging.compare --suite "$suite" --out "$W/compare_$name" --jobs "$jobs" \
    --timeout "$TIMEOUT" --methods "$methods" $COMPARE_ARGS "$@" "${ablation[@]}" >"$W/compare_$name.log" 2>&1
  step "compare_$name rc=$?"
}

step "start: $STEPS"
want vision && (python3 "$here/build_vision.py" "$W/vision" --offline --cache "$CACHE" --device $DEVICE $BUILD_ARGS \
  >"$W/build_vision.log" 2>&1; step "built vision rc=$?") &
want text && (python3 "$here/build_text.py" "$W/text" --offline --cache "$CACHE" --device $DEVICE $BUILD_ARGS \
  >"$W/build_text.log" 2>&1; step "built text rc=$?") &
# hetero: EfficientNet-Lite0 experts (fine-tuned as soon as the vision build has written their tasks'
# splits, beside the rest of that build), then, once the vision suite is complete, their distillation into
# MobileNetV2 students, once, before the comparison's parallel runs all load the cached students
data_written() {  # data_written TASK...: every split of each task saved by build_vision.py
  local t s
  for t in "$@"; do for s in train validation test; do
    [ -f "$W/vision/data/$t/$s/state.json" ] || return 1
  done; done
}
# waits for those splits, and stops (with the reason as the hetero step's line) on a task the vision suite
# does not have or a vision build that ended without writing them
wait_for_splits() {
  local t
  until data_written $HETERO_TASKS; do
    if [ -f "$W/vision/tasks.json" ]; then
      for t in $HETERO_TASKS; do
        grep -q "\"$t\"" "$W/vision/tasks.json" || { step "built hetero rc=2 ($t is not a task of the vision suite)"; return 1; }
      done
    fi
    if tail -n +$((START + 1)) "$W/status" | grep -q "^[0-9:]* built vision" && ! data_written $HETERO_TASKS; then
      step "built hetero rc=2 (the vision build ended without the splits of $HETERO_TASKS)"; return 1
    fi
    sleep 5
  done
  sleep 5
}
want hetero && (if want vision; then wait_for_splits || exit 1; fi
  python3 "$here/build_hetero_vision.py" "$W/vision" \
  --tasks $HETERO_TASKS --offline --cache "$CACHE" --device $DEVICE $BUILD_ARGS >"$W/build_hetero.log" 2>&1 && \
  wait_for vision && \
  STATSMERGING_HEADS_SUITE_DIR="$W/vision" python3 -m fusion_bench.scripts.cli method=dummy \
    method._target_=fusion_bench_statsmerging.modelpool.heterogeneous.DistillHeterogeneousExperts \
    modelpool=heads_suite_hetero path.log_dir="$W/hetero_distill" >"$W/hetero_distill.log" 2>&1
  step "built hetero rc=$?") &
# BatchNorm: every row's merged backbone gets its running statistics re-estimated on 256 unlabeled
# train images per task by the task pool, so no row is judged on statistics its merge did not define.
BN="fabric.accelerator=$DEVICE taskpool.batchnorm_reestimate=true"
want compare_vision && (wait_for vision; compare vision "$W/vision" "$ROWS" "$JOBS_VISION" --extra-overrides "$BN") &
want compare_text && (wait_for text; compare text "$W/text" "$ROWS" "$JOBS_TEXT" --extra-overrides "fabric.accelerator=$DEVICE") &
want compare_hetero && (wait_for hetero; compare hetero "$W/vision" "$HETERO_ROWS" "$JOBS_HETERO" \
  --modelpool heads_suite_hetero --taskpool heads_suite --extra-overrides "$BN") &
wait
step "done: $STEPS"
