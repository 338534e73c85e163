#!/usr/bin/env bash
# One build (seed SEED) of the three real suites and the evidence rows on each (statsmerging-compare
# --methods evidence: StatsMerging-R as committed, free coefficients and the learner alone at its budget,
# SAMerging at its own, task arithmetic at 0.3 and with λ chosen label-free, TIES, TSV-M and the references),
# in one lease of one H100/H200. The seed sets each builder's splits and fine-tuning seeds.
#   source benchmarks/device_env.sh
#   setsid nohup bash benchmarks/real_suites/evidence_campaign.sh WORK CACHE SEED [cnn|text|all] >LOG 2>&1 &
# cnn: the vision and heterogeneous suites (their assets: the vision cache and EfficientNet); text: the text
# suite (MiniLM, which arrives in later calls); all (default): both. WORK/real/status says what finished;
# benchmarks/pack_campaign.sh WORK OUT packs it; then, here:
#   python benchmarks/real_suites/evidence.py --unpack campaign.tgz --seed SEED   (raw runs into docs/results/evidence)
# A CPU plumbing check: DEVICE=cpu BUILD_ARGS=--tiny COMPARE_ARGS="--fast --fast-steps 3" ... (minutes).
set -u
W=$1; CACHE=$2; SEED=$3; STAGE=${4:-all}
here=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# the heterogeneous suite starts last (after the vision build and the distillation): it runs without the
# learner-alone row, so that one lease finishes it
export BUILD_ARGS="${BUILD_ARGS:-} --seed $SEED" COMPARE_METHODS=${COMPARE_METHODS:-evidence}
export HETERO_METHODS=${HETERO_METHODS:-pretrained,individual,task_arithmetic,task_arithmetic_agreement,ties_merging,tsv_m,samerging,statsmerging_residual,samerging_matched}
export COMPARE_TIMEOUT=${COMPARE_TIMEOUT:-1500} JOBS_VISION=${JOBS_VISION:-10} JOBS_HETERO=${JOBS_HETERO:-10} JOBS_TEXT=${JOBS_TEXT:-10}
mkdir -p "$W/real"; echo "seed $SEED" >"$W/real/seed"
case $STAGE in
  cnn) STEPS="vision hetero compare_vision compare_hetero" bash "$here/gpu_real_suites.sh" "$W/real" "$CACHE" ;;
  text) STEPS="text compare_text" bash "$here/gpu_real_suites.sh" "$W/real" "$CACHE" ;;
  all) STEPS="vision hetero text compare_vision compare_hetero compare_text" bash "$here/gpu_real_suites.sh" "$W/real" "$CACHE" ;;
  *) echo "evidence_campaign.sh: error: stage must be cnn, text or all, got '$STAGE'" >&2; exit 2 ;;
esac
