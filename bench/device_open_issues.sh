#!/usr/bin/env bash
# The GPU measurements still owed by issues 22 and 23, in one device call (under 10 minutes):
#
#   bash bench/device_open_issues.sh            # device tool, any one-GPU kind; nothing to carry
#   STEPS="tests core_merge" bash bench/device_open_issues.sh   # some of the steps (default: all three)
#   STAGE_SMOLLM2=1 bash bench/device_open_issues.sh   # also stage part 0 of the SmolLM2 GGUF
#       (carry .carry/smollm2/part0 .carry/smollm2/MANIFEST.json .wheels; bench/device_smollm2.sh)
#
# 1. every CUDA test (`-m gpu`): the merges' compiled kernels, core-space merges, decoding graphs;
# 2. issue 22: bench/core_merge.py, the core-space merges against lorasoup's ΔW-space merges and
#    PEFT's add_weighted_adapter in one process (Llama-2-7B shape, two r=32 adapters);
# 3. issue 23: bench/cat_step.py, the frozen floor, PEFT's multi-adapter loop (bf16 and its default
#    fp32 adapters) and CAT, K = 2 and 4, each in eager, compile and reduce-overhead, in one process,
#    with the compiled steps' CUDA kernels by group (--profile).
#
# Leaves in $OUT: env.txt, gpu-tests.txt, core_merge.json, core_merge.log, cat_step.json,
# cat_step.log. Each step has its own time limit, so one that hangs does not take the others' results
# with it.
set -uo pipefail

out=${OUT:-/tmp/lorasoup-out}
mkdir -p "$out"
PY=${PYTHON:-python3}

if [[ -n "${STAGE_SMOLLM2:-}" ]]; then
  bash bench/device_smollm2.sh stage || echo "== staging SmolLM2 failed (the measurements go on)"
fi
export PYTHONPATH=src

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c 'import sys, torch, transformers, peft, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| peft", peft.__version__, "| triton", triton.__version__)'
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the log, show its end
  local name=$1 limit=$2
  shift 2
  local began=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" >"$out/$name" 2>&1 || rc=$?
  echo "== $name: exit $rc after $((SECONDS - began)) s"
  tail -n "${TAIL:-14}" "$out/$name"
}

wanted() { [[ " ${STEPS:-tests core_merge cat_step} " == *" $1 "* ]]; }

wanted tests && step gpu-tests.txt 130 "$PY" -m pytest -q -m gpu tests -p no:warnings -x --durations=5
wanted core_merge && step core_merge.log 170 "$PY" bench/core_merge.py --out "$out/core_merge.json"
wanted cat_step && TAIL=40 step cat_step.log 240 "$PY" bench/cat_step.py --ks 2 4 --variants floor peft_multi peft_fp32 cat \
  --compile-scope layers --profile --steps 15 --out "$out/cat_step.json"
true  # a skipped last step is not a failure
