# Source on the lent GPU machine: installs the carried wheels (.whl) into /tmp/site and points
# Python at them and at this checkout (no pip index there). Usage: source benchmarks/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PATH=/tmp/site/bin:$PATH
