#!/usr/bin/env bash
# Prepare .whl (carried to the GPU machine, under 64 MiB): the wheels of bench/gpu_wheels.sh (or a copy of an existing
# .whl/site: WHL_FROM=/path/to/.whl) and .whl/data/medqa.{train,test}.jsonl for bench/tutorial_7b.py, made from the
# tutorial's workbook (tests/data) by the tutorial's own commands. Usage (repo root, here, with lowtune's venv):
#   WHL_FROM=/work/main/.whl PYTHON=/work/main/.venv/bin/python bench/prepare_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -n "${WHL_FROM:-}" ]; then
  grep -qx '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
  rm -rf .whl && mkdir -p .whl && cp -r "$WHL_FROM/site" .whl/site && { [ -d "$WHL_FROM/bin" ] && cp -r "$WHL_FROM/bin" .whl/bin || true; }
else
  bench/gpu_wheels.sh
fi
mkdir -p .whl/data
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
lt() { OMP_NUM_THREADS=1 "$PYTHON" -c 'import sys; from lowtune.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
lt data convert tests/data/MedInfo2019-QA-Medications.xlsx --sheet DrugQA --map input=Question output=Answer \
  --system "You are a professional, highly experienced doctor professor. You always provide accurate, comprehensive, and detailed answers based on the patients' questions." \
  -o .whl/data/medqa.jsonl
lt data split .whl/data/medqa.jsonl --train 0.7 --seed 42
wc -l .whl/data/medqa.train.jsonl .whl/data/medqa.test.jsonl
du -sh .whl
