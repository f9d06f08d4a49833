#!/usr/bin/env bash
# Multi-GPU benchmarks on one machine with 2 GPUs, from the repository root:
#
#     bash bench/run_multi_gpu.sh
#
# 1. prepare once: a random Llama-2-7B-shaped model in bf16, adapters and data, in $WORK;
# 2. lorasoup train on 1 GPU, on 2 GPUs with DDP, on 2 GPUs with FSDP2 (bench/multi_gpu_train.py);
# 3. lorasoup cat on 1 GPU and on 2 GPUs with DDP (bench/multi_gpu_cat.py).
# Training runs first: it is the new measurement, and what a time limit cuts off is the end.
#
# Results: bench/results/multi_gpu_train_${SHAPE}_${TAG}.json and multi_gpu_cat_${SHAPE}_${TAG}.json,
# copied to $OUT when it is set (the device machine sends $OUT back), with every run's run.json
# ($OUT/runs/) and log ($OUT/logs/). A failed run is logged and the script goes on to the next; the
# exit code is the number of failed steps.
#
# Settings (environment): SHAPE=7b, LAYERS (default: the shape's 32), STEPS=20, WORK=/tmp/mgpu,
# TAG=h100, RUN_TIMEOUT=150 seconds per run, PYTHON=python3, OUT=$WORK-out when not set.
set -euo pipefail

SHAPE=${SHAPE:-7b}
STEPS=${STEPS:-20}
WORK=${WORK:-/tmp/mgpu}
TAG=${TAG:-h100}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}  # a healthy 7B run takes under a minute
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$WORK-out}  # not inside $WORK: prepare empties that
NAME=${SHAPE}${LAYERS:+_${LAYERS}l}
export PYTHONPATH=src PYTHONUNBUFFERED=1 OUT
# NVLink multicast stays off (the machine sets these; a launcher must not lose them).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT/logs" "$OUT/runs" bench/results

LAUNCH=("$PYTHON" -m accelerate.commands.launch)
failed=0
summary=()

# step NAME COMMAND...: run it with a time limit, log it, keep its run.json, never stop the script.
step() {
    local name=$1 start=$SECONDS status=0
    shift
    echo "=== $name: $*"
    timeout --kill-after=15 "$RUN_TIMEOUT" "$@" 2>&1 | tee "$OUT/logs/$name.log" || status=$?
    local took=$((SECONDS - start))
    if [ "$status" -eq 0 ]; then
        summary+=("$(printf '%-14s ok      %4d s' "$name" "$took")")
    else
        failed=$((failed + 1))
        summary+=("$(printf '%-14s FAILED  %4d s  (exit %d; log: %s)' "$name" "$took" "$status" "$OUT/logs/$name.log")")
        echo "!!! $name failed with exit code $status after $took s; going on"
    fi
    if [ -f "$WORK/$name/run.json" ]; then
        cp "$WORK/$name/run.json" "$OUT/runs/$name.json" || true
    fi
}

nvidia-smi -L || true
"$PYTHON" -c 'import torch, transformers, peft, accelerate; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__, "gpus", torch.cuda.device_count())'

step prepare "$PYTHON" bench/multi_gpu_train.py prepare --shape "$SHAPE" ${LAYERS:+--layers "$LAYERS"} \
    --work "$WORK" --steps "$STEPS"
if [ "$failed" -ne 0 ]; then
    echo "prepare failed: nothing to run"
    exit 1
fi

# One GPU means one visible GPU: with two visible, the Trainer of a single process would use
# DataParallel and double the batch (the first 7B run did; lorasoup train now says so).
step train-one env CUDA_VISIBLE_DEVICES=0 "$PYTHON" -m lorasoup train "$WORK/train.yaml" --output "$WORK/train-one"
step train-ddp "${LAUNCH[@]}" --config_file configs/accelerate/ddp-2gpu.yaml -m lorasoup train \
    "$WORK/train.yaml" --output "$WORK/train-ddp" --set train.batch_size=8
step train-fsdp "${LAUNCH[@]}" --config_file configs/accelerate/fsdp-2gpu.yaml -m lorasoup train \
    "$WORK/train.yaml" --output "$WORK/train-fsdp" --set train.batch_size=8
step compare-train "$PYTHON" bench/multi_gpu_train.py compare "$WORK/train-one" "$WORK/train-ddp" \
    "$WORK/train-fsdp" --out "bench/results/multi_gpu_train_${NAME}_${TAG}.json"

step cat-one env CUDA_VISIBLE_DEVICES=0 "$PYTHON" -m lorasoup cat "$WORK/cat.yaml" --output "$WORK/cat-one" --set train.batch_size=8
step cat-two "${LAUNCH[@]}" --num_processes 2 -m lorasoup cat "$WORK/cat.yaml" --output "$WORK/cat-two" \
    --set train.batch_size=4
step compare-cat "$PYTHON" bench/multi_gpu_cat.py compare "$WORK/cat-one" "$WORK/cat-two" \
    --out "bench/results/multi_gpu_cat_${NAME}_${TAG}.json"

echo
echo "=== summary ($SHAPE${LAYERS:+, $LAYERS layers}, $STEPS steps; results in bench/results/ and $OUT)"
printf '%s\n' "${summary[@]}"
grep -h -A 3 '^run ' "$OUT/logs/compare-train.log" 2>/dev/null || true
"$PYTHON" - "bench/results/multi_gpu_cat_${NAME}_${TAG}.json" <<'PY' 2>/dev/null || echo "CAT: no result"
import json, sys
report = json.load(open(sys.argv[1]))
rates = {k: round(r["steady_steps_per_s"] or r["steps_per_s"], 3) for k, r in report["runs"].items()}
peaks = {k: r["peak_gpu_memory_gib"] for k, r in report["runs"].items()}
print(f"CAT: steps/s {rates}, speed-up {report['speedup_two_over_one']:.2f}x, peak GiB {peaks}, "
      f"max |w1 - w2| {report['max_abs_weight_difference']:.2e}")
PY
exit "$failed"
