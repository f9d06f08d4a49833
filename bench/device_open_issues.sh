#!/usr/bin/env bash
# The GPU measurements still owed by issues 22 and 23, in device calls of under 10 minutes each:
#
#   bash bench/device_open_issues.sh            # device tool, any one-GPU kind; carry .wheels
#       (gguf and cma, from `bench/device_smollm2.sh prepare`: the test suite imports gguf, and without
#       it pytest stops at collection, as the session-8 call did)
#   STEPS="tests core_merge" bash bench/device_open_issues.sh   # some of the steps (default: all three)
#   STAGE_SMOLLM2=1 bash bench/device_open_issues.sh   # also stage part 0 of the SmolLM2 GGUF
#       (carry .carry/smollm2/part0 .carry/smollm2/MANIFEST.json .wheels; bench/device_smollm2.sh)
#   STAGE_REAL_MODEL=gemma3 bash bench/device_open_issues.sh   # also stage the Gemma part carried
#       (carry .carry/gemma3/partK .carry/gemma3/MANIFEST.json; parts 0-3 ride on four calls' measurements,
#       part 4 on bench/device_real_model.sh's run call: see docs/real-model.md)
#
# Six more steps, never run by default: user_path (at most 330 s), eval_backends (at most 200 s),
# core_merge_register and core_merge_prefault (at most 120 s each, issue 22: core_merge with pinned
# memory locked by 8 threads, and with pageable memory first touched by torch's threads),
# study_probe (at most 240 s; issue 18: where a real-model seed's time goes, bench/study_probe.py)
# and study (at most STUDY_LIMIT, 540 s: the scaling study of docs/study.md on one GPU, sizes
# STUDY_ONLY, e.g. "4M,100M", default all; its reports come back as study.tar.gz).
# The default three take up to 830 s with their limits (about 470 s on an H100 in session 8: tests 90,
# core_merge 60, cat_step ~320 with floor, PEFT bf16 and fp32 and CAT; CAT_VARIANTS now defaults to
# floor, PEFT bf16, CAT and the cat_stacked experiment: about as long), so run
# STEPS="tests core_merge" and STEPS=cat_step as two calls; each other step goes in a call beside
# some of them, e.g. two calls back to back (the SmolLM2 GGUF travels in two parts of 47 MiB, one
# per call):
#   STAGE_SMOLLM2=1 STEPS="user_path" bash bench/device_open_issues.sh
#       carry .carry/smollm2/part0 .carry/smollm2/MANIFEST.json .wheels   (part 0 and gguf ride along)
#   STEPS="tests core_merge eval_backends" bash bench/device_open_issues.sh   # machine still warm
#       carry .carry/smollm2/part1 .carry/smollm2/MANIFEST.json .carry/lora-soups
#   (the carry comes from `bench/device_smollm2.sh prepare`; eval_backends stages part 1 and joins the
#   GGUF, which needs part 0 staged on this machine: if it is not, only that step is skipped)
#
# 1. every CUDA test (`-m gpu`): the merges' compiled kernels, core-space merges, decoding graphs;
# 2. issue 22: bench/core_merge.py, the core-space merges against lorasoup's ΔW-space merges and
#    PEFT's add_weighted_adapter in one process (Llama-2-7B shape, two r=32 adapters);
# 3. issue 23: bench/cat_step.py, the frozen floor, PEFT's multi-adapter loop (bf16 and its default
#    fp32 adapters, only if CAT_VARIANTS names peft_fp32), CAT and the stacked-[W0; A] experiment
#    (bench/cat_stacked.py), K = 2 and 4, each in eager, compile and reduce-overhead, in one process,
#    with the compiled steps' CUDA kernels by group (--profile).
# 4. (STEPS=user_path) issue 23: bench/user_path.py, `lorasoup cat` (train.compile=reduce-overhead)
#    and `lorasoup train` from YAML on a 7B-shaped base saved to /tmp, each step timed from run.json,
#    against cat_step.py's CAT step and a bare LoRA step in the same call (--bench-step);
#    USER_PATH_KS="2 4" for both K (about a minute more).
# 5. (STEPS=eval_backends) issue 23: bench/eval_backends.py, `lorasoup eval`'s cudagraph backend against
#    hf on SmolLM2-135M-Instruct (the GGUF), GSM-Hard with the paper's 8-shot prompt, first
#    EVAL_LIMIT (512) problems at batch 128: tokens/s and identical generations, one process.
#
# CAT_MODES limits cat_step's modes (default eager, compile, reduce-overhead), e.g. "compile reduce-overhead";
# CAT_MODES=max-autotune CAT_VARIANTS="floor cat cat_stacked" (a call of its own: autotuning takes
# minutes a variant) tries Inductor's Triton GEMM templates under graphs, with the adds fused.
#
# Leaves in $OUT: env.txt, gpu-tests.txt, core_merge.json, core_merge.log, cat_step.json,
# cat_step.log (and user_path.json, user_path.log, eval_backends.json, eval_backends.log). Each step
# has its own time limit, so one that hangs does not take the others' results with it.
set -uo pipefail

out=${OUT:-/tmp/lorasoup-out}
mkdir -p "$out"
PY=${PYTHON:-python3}

staged_model=${STAGE_REAL_MODEL:-${STAGE_SMOLLM2:+smollm2}}
if [[ -n "$staged_model" ]]; then
  REAL_MODEL=$staged_model bash bench/device_real_model.sh stage ||
    echo "== staging $staged_model failed (the measurements go on)"
fi
site=${LORASOUP_ASSETS:-/tmp/lorasoup-assets}/site
if compgen -G ".wheels/*.whl" >/dev/null; then  # the packages the device lacks, when carried
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .wheels/*.whl || echo "== installing .wheels failed"
fi
export PYTHONPATH="src:$site${PYTHONPATH:+:$PYTHONPATH}"

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
  # INT_FIRST: an interrupt, not TERM, at the limit (the study then keeps its finished sizes)
  timeout ${INT_FIRST:+-s INT} --kill-after=10 "$limit" "$@" >"$out/$name" 2>&1 || rc=$?
  echo "== $name: exit $rc after $((SECONDS - began)) s"
  tail -n "${TAIL:-14}" "$out/$name"
}

wanted() { [[ " ${STEPS:-tests core_merge cat_step} " == *" $1 "* ]]; }

wanted tests && step gpu-tests.txt 240 "$PY" -m pytest -q -m gpu tests -p no:warnings -x --durations=5
wanted core_merge && step core_merge.log 170 "$PY" bench/core_merge.py --profile --out "$out/core_merge.json"
# issue 22: the same merges with torch's pinned memory page-locked by cudaHostRegister from 8 threads
# instead of cudaHostAlloc (torch's allocator settings): the page-locking was most of core TIES' time
wanted core_merge_register && PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:8 \
  step core_merge_register.log 120 "$PY" bench/core_merge.py --skip-peft --methods core_linear core_ties core_dare \
  --caps-mib 256 --profile --out "$out/core_merge_register.json"
# issue 22: and with pageable host memory first touched by torch's threads instead of pinned memory
wanted core_merge_prefault && step core_merge_prefault.log 120 "$PY" bench/core_merge.py --skip-peft \
  --methods core_linear core_ties core_dare --caps-mib 256 --host-copy prefaulted --profile \
  --out "$out/core_merge_prefault.json"
# shellcheck disable=SC2086  # CAT_VARIANTS is a list
wanted cat_step && TAIL=40 step cat_step.log 420 "$PY" bench/cat_step.py --ks 2 4 --variants ${CAT_VARIANTS:-floor peft_multi cat cat_stacked} \
  ${CAT_MODES:+--modes $CAT_MODES} --compile-scope layers --profile --steps 15 --out "$out/cat_step.json"
# shellcheck disable=SC2086  # USER_PATH_KS is a list of K
wanted user_path && TAIL=20 step user_path.log 330 "$PY" bench/user_path.py --ks ${USER_PATH_KS:-2} --bench-step \
  --work /tmp/lorasoup-user-path --reuse --out "$out/user_path.json"
# issue 18's planning: a SmolLM2-shaped seed's training (fp32 against TF32) and scoring (base, LoRA as
# PEFT keeps it, LoRA merged), random weights, so it needs no GGUF part
wanted study_probe && TAIL=6 step study_probe.log 240 "$PY" bench/study_probe.py --work /tmp/lorasoup-probe \
  --out "$out/study_probe.json"
if wanted eval_backends; then
  if [[ -f .carry/smollm2/part1 ]]; then "$PY" bench/carry.py stage .carry/smollm2 --part 1; fi
  if gguf=$("$PY" bench/carry.py join .carry/smollm2); then
    HF_HUB_OFFLINE=1 step eval_backends.log 200 "$PY" bench/eval_backends.py \
      --model "$gguf" --data .carry/lora-soups --limit "${EVAL_LIMIT:-512}" --batch-size 128 \
      --out "$out/eval_backends.json"
  else
    echo "== eval_backends: no SmolLM2 GGUF on this machine (stage part 0 first; see the header)"
  fi
fi
if wanted study; then  # issue 22's GPU-study rows: the scaling study with today's default rows
  work=/tmp/lorasoup-study
  # shellcheck disable=SC2086  # STUDY_ONLY: a comma list of sizes, or empty for the whole ladder
  # --resume: a size the limit cuts goes on in the next call on this machine (its LoRAs and rows kept)
  INT_FIRST=1 TAIL=20 step study.log "${STUDY_LIMIT:-540}" "$PY" -m lorasoup study "${STUDY_CONFIG:-configs/study/scale-gpu.yaml}" \
    --output "$work" --resume ${STUDY_ONLY:+--only "$STUDY_ONLY"}
  "$PY" -m lorasoup study "${STUDY_CONFIG:-configs/study/scale-gpu.yaml}" --output "$work" --report-only >>"$out/study.log" 2>&1 || true
  tar -C "$work" -czf "$out/study.tar.gz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' \
    --exclude='*/base' --exclude='*/eval' . || echo "== study: nothing to pack"
fi
true  # a skipped last step is not a failure
