#!/usr/bin/env bash
# The GPU measurements of issues 4 and 6 (their session-6 figures), in one device call (under 10 minutes):
#
#   bash bench/device_open_issues.sh            # device tool, any one-GPU kind; nothing to carry
#
# 1. the CUDA tests: compiled Triton kernels of the merges (keyed magnitude cut, trim by last tied
#    position), captured decoding graphs with a shared prefix;
# 2. issue 4: bench/merge.py, the ΔW-space merges against PEFT's add_weighted_adapter in one
#    process, with a torch.profiler table per method;
# 3. issue 6: bench/generate_throughput.py at GSM-Hard's proportions (1,186-token prompts of which
#    1,114 are the shared 8-shot prefix, 128 new tokens), the cudagraph backend with and without
#    sharing the prefix (the step's split attention in torch operations, or in the two Triton
#    kernels of shared_prefix.attend_decode_fused), batch 64 and 128, against the reference loop.
#
# Leaves in $OUT: env.txt, gpu-tests.txt, merge.json, merge-profile.txt, merge.log,
# generate_shared_prefix.json, generate.log. Each step has its own time limit, so one that hangs
# does not take the others' results with it.
set -uo pipefail

out=${OUT:-/tmp/lorasoup-out}
mkdir -p "$out"
export PYTHONPATH=src
PY=${PYTHON:-python3}

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
  tail -n 12 "$out/$name"
}

step gpu-tests.txt 120 "$PY" -m pytest -q -m gpu tests/merging tests/evaluation -p no:warnings
step merge.log 230 "$PY" bench/merge.py --methods ties dare_linear dare_ties magnitude_prune \
  --profile "$out/merge-profile.txt" --out "$out/merge.json"
step generate.log 220 "$PY" bench/generate_throughput.py --shape 7b --batch 64 128 --prompt-len 1186 \
  --shared-prefix 1114 --new-tokens 128 --backends cudagraph --graph-prefix-sharing on off \
  --graph-prefix-kernel torch triton --repeats 2 --out "$out/generate_shared_prefix.json"
