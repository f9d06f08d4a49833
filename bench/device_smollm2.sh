#!/usr/bin/env bash
# The SmolLM2 real-model study on the GPU machine: bench/device_real_model.sh with REAL_MODEL=smollm2
# (its header says how: prepare here, stage, run in back-to-back device calls).
REAL_MODEL=smollm2 exec bash "$(dirname "$0")/device_real_model.sh" "$@"
