#!/usr/bin/env bash
# Everything the offline-suite tables in docs/benchmarks.md need, on one GPU machine, in one go:
#   1. merge_speed.py per-task-backward variants (timed alone, before anything else runs)
#   2. the full offline CLIP suite (build_clip_suite.py --size full, time-budgeted)
#   3. in parallel on the built suite: the comparison (all default rows), the heterogeneous pool
#      (two experts swapped for ResNets, distilled, then merged), generalisation to held-out
#      tasks, robustness to corrupted images.
# Usage (from the repo root, after `source benchmarks/device_env.sh` on the lent machine):
#   bash benchmarks/gpu_offline_suite.sh WORK_DIR FASHION_MNIST_DIR [BUILD_BUDGET_S]
# Environment: STEPS (default "speed build compare hetero generalization robustness") picks steps;
# COMPARE_JOBS (4), COMPARE_TIMEOUT (480 s) and COMPARE_METHODS (the default list) shape the comparison.
# Results land in WORK_DIR/{merge_speed_pt.json,suite/,compare/,hetero/,generalization/,robustness/};
# WORK_DIR/status has one line per finished step.
set -u
W=$(realpath -m "$1"); FMNIST=$2; BUDGET=${3:-300}
mkdir -p "$W"; SUITE=$W/suite
STEPS=${STEPS:-speed build compare hetero generalization robustness}
step() { echo "$(date +%T) $*" >>"$W/status"; }
want() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }

step "start: $STEPS"
want speed && { python3 benchmarks/merge_speed.py --model b32 --experts 8 --batch 16 --device cuda:0 --ours fp32,fp32-pt,bf16-pt \
  --host fp32 --steps 10 --no-check-stats --json "$W/merge_speed_pt.json" >"$W/merge_speed_pt.log" 2>&1
step "merge_speed rc=$?"; }

want build && { python3 benchmarks/build_clip_suite.py --out "$SUITE" --size full --device cuda --fashion-mnist "$FMNIST" \
  --time-budget "$BUDGET" --overwrite >"$W/build.log" 2>&1
step "build rc=$?"; }

export STATSMERGING_SUITE_DIR=$SUITE
AW="--set adamerging_task:method.num_workers=2 --set adamerging_layer:method.num_workers=2
    --set adamerging_task_train:method.num_workers=2 --set adamerging_layer_train:method.num_workers=2"
METHODS=${COMPARE_METHODS:+--methods $COMPARE_METHODS}
want compare && (python3 -m fusion_bench_statsmerging.compare --suite "$SUITE" --out "$W/compare" \
   --jobs "${COMPARE_JOBS:-4}" --timeout "${COMPARE_TIMEOUT:-480}" $METHODS $AW \
   >"$W/compare.log" 2>&1; step "compare rc=$?") &
want hetero && (python3 benchmarks/build_hetero_experts.py --suite "$SUITE" --tasks syn_landcover,syn_housenum --device cuda \
   >"$W/hetero_build.log" 2>&1 && \
 python3 -m fusion_bench.scripts.cli method=dummy \
   method._target_=fusion_bench_statsmerging.modelpool.heterogeneous.DistillHeterogeneousExperts modelpool=clip_suite_hetero \
   path.log_dir="$W/hetero_distill" >"$W/hetero_distill.log" 2>&1 && \
 python3 -m fusion_bench_statsmerging.compare --suite "$SUITE" --modelpool clip_suite_hetero --taskpool clip_suite \
   --out "$W/hetero" --jobs 2 --timeout 480 \
   --methods pretrained,individual,simple_average,task_arithmetic,ties_merging,adamerging_layer_train,statsmerging_task,statsmerging_layer \
   --set adamerging_layer_train:method.num_workers=2 >"$W/hetero_compare.log" 2>&1; step "hetero rc=$?") &
want generalization && (python3 benchmarks/generalization.py --suite "$SUITE" --out "$W/generalization" --timeout 480 \
   --seen syn_fashion,syn_housenum,syn_textures,syn_signs,syn_scenes,syn_counts --unseen syn_digits,syn_landcover \
   --set adamerging_layer_train:method.num_workers=2 >"$W/generalization.log" 2>&1; step "generalization rc=$?") &
want robustness && (python3 benchmarks/robustness.py --suite "$SUITE" --out "$W/robustness" --timeout 480 \
   --tasks syn_fashion,syn_landcover,syn_scenes,syn_signs --severity 3 \
   --set adamerging_layer_train:method.num_workers=2 >"$W/robustness.log" 2>&1; step "robustness rc=$?") &
wait
step done
