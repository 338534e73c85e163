#!/usr/bin/env bash
# Packs a GPU campaign's finished results for the trip back (benchmarks/gpu_campaign.sh): the comparison
# folders, logs, status and engine figures; no weights, checkpoints or suite data. Usage: pack_campaign.sh WORK OUT
set -u
W=$1; OUT=$2
cd "$W" || exit 1
# the builders' manifests (expert and linear-probe accuracies: the tables' reference rows) travel apart
mkdir -p real/manifests
for s in vision text; do [ -f "real/$s/manifest.json" ] && cp "real/$s/manifest.json" "real/manifests/$s.json"; done
[ -f real/vision/hetero_experts/accuracies.json ] && cp real/vision/hetero_experts/accuracies.json real/manifests/hetero.json
tar czf "$OUT/campaign.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude='*.npz' \
  --exclude='real/vision' --exclude='real/text' --exclude='real/hetero_distill' \
  $(ls -d status engine real/status real/*.log real/manifests real/compare_* 2>/dev/null) 2>/dev/null
ls -la "$OUT"; cat real/status status 2>/dev/null
