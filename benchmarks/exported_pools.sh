#!/usr/bin/env bash
# Issue 18's rows: the offline CLIP suite's own experts handed to the methods three ways -- as transformers
# folders (the reference), exported to OpenCLIP's file layout (modelpool=openclip_suite, converted back
# exactly by the pool), and as LoRA adapters fine-tuned on the same tasks (modelpool=clip_suite_lora).
# CPU, a few minutes a comparison. Usage: bash benchmarks/exported_pools.sh OUT [METHODS]
set -euo pipefail
OUT=$(realpath -m "${1:-/tmp/exported_pools}")
M=${2:-pretrained,individual,simple_average,task_arithmetic,ties_merging,statsmerging_layer,statsmerging_residual,samerging}
PY=${PYTHON:-python}
$PY -m fusion_bench_statsmerging.fixtures.demo --build-only --out "$OUT"
$PY -c "import sys; from fusion_bench_statsmerging.fixtures.openclip import export_suite_to_openclip; \
from fusion_bench_statsmerging.fixtures.lora import build_tiny_lora_experts; \
export_suite_to_openclip(sys.argv[1]); build_tiny_lora_experts(sys.argv[1])" "$OUT/suite"
for pools in "dense clip_suite clip_suite" "openclip openclip_suite openclip_suite" "lora clip_suite_lora clip_suite"; do
  set -- $pools
  STATSMERGING_SUITE_DIR="$OUT/suite" $PY -m fusion_bench_statsmerging.compare --suite "$OUT/suite" \
    --out "$OUT/compare_$1" --modelpool "$2" --taskpool "$3" --methods "$M" --jobs "${JOBS:-1}" \
    --extra-overrides "fabric.accelerator=cpu"
done
