#!/usr/bin/env bash
# Prepare .whl/site: the packages the GPU machine lacks, unpacked for PYTHONPATH (it has no network and Python 3.12).
# Usage (repo root, here): bench/gpu_wheels.sh; then device runs with carry [".whl"] and PYTHONPATH=.whl/site:src,
# e.g. `python3 bench/bench_train.py b,g` or `python3 -m pytest -p no:cacheprovider tests/gpu`.
# .whl/bin/py-spy samples the host side of a run (bench_train.py case q); .whl/trlsite holds TRL (case dpo).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl/site
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  bitsandbytes==0.50.2 liger-kernel==0.8.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pyyaml==6.0.4 py-spy==0.4.3 \
  sentencepiece==0.2.3 protobuf==7.36.2
for wheel in .whl/*.whl; do
  case "$wheel" in
    *py_spy*) (cd .whl && unzip -q -o -j "$(basename "$wheel")" '*/scripts/py-spy' -d bin) ;;
    *) (cd .whl/site && unzip -q -o "../$(basename "$wheel")") ;;
  esac
done
# bitsandbytes ships a library per CUDA release; the GPU machine runs CUDA 13.0 (keeps the tree under 64 MiB)
find .whl/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
rm -f .whl/*.whl
# TRL for the DPO bench (bench/trl_dpo.py), apart so lowtune's own runs never import it; the machine has pyarrow,
# pandas and xxhash
mkdir -p .whl/trl && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl/trl \
  trl==1.16.0 datasets==5.2.0 dill==0.3.8 multiprocess==0.70.19
for wheel in .whl/trl/*.whl; do (cd .whl && mkdir -p trlsite && cd trlsite && unzip -q -o "../trl/$(basename "$wheel")"); done
rm -rf .whl/trl
du -sh .whl/site .whl/trlsite
