"""LoRA training (``lorasoup train``) on 1 GPU vs 2 GPUs with DDP vs 2 GPUs with FSDP2, same global batch.

    PYTHONPATH=src python bench/multi_gpu_train.py prepare --shape 7b --work /tmp/mgpu --steps 20
    PYTHONPATH=src python -m lorasoup train /tmp/mgpu/train.yaml --output /tmp/mgpu/train-one
    PYTHONPATH=src accelerate launch --config_file configs/accelerate/ddp-2gpu.yaml -m lorasoup train \\
        /tmp/mgpu/train.yaml --output /tmp/mgpu/train-ddp --set train.batch_size=8
    PYTHONPATH=src accelerate launch --config_file configs/accelerate/fsdp-2gpu.yaml -m lorasoup train \\
        /tmp/mgpu/train.yaml --output /tmp/mgpu/train-fsdp --set train.batch_size=8
    PYTHONPATH=src python bench/multi_gpu_train.py compare /tmp/mgpu/train-one /tmp/mgpu/train-ddp \\
        /tmp/mgpu/train-fsdp --out RESULT.json

(``bench/run_multi_gpu.sh`` runs all of it, and the CAT comparison of ``multi_gpu_cat.py``.)

``prepare`` does what ``multi_gpu_cat.py prepare`` does (random-weight Llama in bf16, its tokenizer,
two adapters, CAT data and ``cat.yaml``: one model on disk serves both benchmarks) and adds ``text.txt``
and ``train.yaml``. The recipe is the LoRA Soups paper's batch and length with a smaller rank: LoRA
r = 16 (alpha 32) on q, k, v, up, down, global batch 16 rows of exactly 256 tokens (``cutoff_len``;
``prepare`` checks the length of every row), so each step trains on 4,096 tokens in every setting:
1 × 16 on one GPU, 2 × 8 on two. bf16; no activation checkpointing: counting the tensors autograd
saves, the 7B shape's activations for 4,096 tokens come to about 23 GiB beside 12.6 GiB of weights,
well inside an 80 GB H100, and checkpointing would cost a third more compute. Dropout 0, so the three
runs compute the same function and their losses agree to bf16 round-off. Loss logged every 5 steps,
no evaluation, no checkpoints; the run writes only the adapter (no merged model). One epoch is
exactly ``--steps`` steps.

``compare`` reads each run's ``run.json``: steady steps/s (past the first fifth of the steps) and
tokens/s, the speed-up over one GPU, peak GPU memory of every process (one per GPU), and the last
logged loss (the mean over steps 16-20) next to the one-GPU run's, and how far each adapter is from
the one-GPU run's (a check of the DDP and FSDP2 gathers). A run directory without
``run.json`` (a failed run) is reported as missing and makes the exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from multi_gpu_cat import TARGETS, command_line, environment, rate, run_summary, write_report
from multi_gpu_cat import prepare as prepare_base_and_cat

GLOBAL_BATCH = 16
ROW_TOKENS = 256


def counting_rows(count: int, words: int) -> list[str]:
    """Rows of ``words`` numbers counting up modulo 100 from a different start: a pattern LoRA can learn,
    each number one token of the word-level tokenizer."""
    return [" ".join(str((start + i) % 100) for i in range(words)) for start in range(count)]


def prepare(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from lorasoup.training.data import build_dataset, load_records

    prepare_base_and_cat(args)
    work = Path(args.work)
    text = work / "text.txt"
    text.write_text("\n\n".join(counting_rows(args.steps * GLOBAL_BATCH, ROW_TOKENS + 16)) + "\n")
    rows = build_dataset(
        load_records(text),
        AutoTokenizer.from_pretrained(work / "base"),
        template="plain",
        cutoff_len=ROW_TOKENS,
    )
    lengths = {len(row["input_ids"]) for row in rows.examples}
    if lengths != {ROW_TOKENS}:
        raise SystemExit(f"rows of {sorted(lengths)} tokens; every row must have exactly {ROW_TOKENS}")
    train = {
        "base_model": str(work / "base"),
        "data": {"sources": [str(text)], "template": "plain", "cutoff_len": ROW_TOKENS},
        "output": str(work / "train-out"),
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
        "train": {
            "learning_rate": 3e-4,
            "max_steps": args.steps,
            "batch_size": GLOBAL_BATCH,
            "grad_accum": 1,
            "dtype": "bfloat16",
            "gradient_checkpointing": False,
            "logging_steps": 5,
            "save_steps": 0,
            "eval_steps": 0,
            "seed": 0,
        },
    }
    (work / "train.yaml").write_text(yaml.safe_dump(train, sort_keys=False))
    print(f"wrote {text} ({len(rows)} rows of {ROW_TOKENS} tokens) and {work / 'train.yaml'}")


def adapter_difference(one: Path, other: Path) -> dict:
    """Whether two runs wrote the same LoRA tensors (names, shapes) and how far apart their values are,
    relative to the largest entry of each tensor: a check that DDP's and FSDP2's adapters are gathered
    right. The runs differ by bf16 round-off, which Adam turns into differences of some percent where a
    gradient is near zero; a wrong gather (zeros, another module's tensor) shows as about 1 or more."""
    from safetensors.torch import load_file

    a, b = (load_file(str(path / "adapter_model.safetensors")) for path in (one, other))
    same = a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    relative = (
        [float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a] if same else []
    )
    return {"same_tensors": same, "tensors": len(b), "max_relative_difference": max(relative, default=None)}


def compare(args: argparse.Namespace) -> None:
    runs, missing = {}, []
    paths = {"one_gpu": Path(args.one), "ddp_2gpu": Path(args.ddp), "fsdp_2gpu": Path(args.fsdp)}
    for label, path in paths.items():
        if not (path / "run.json").is_file():
            missing.append(label)
            runs[label] = {"missing": f"{path}/run.json not found: the run failed or did not run"}
            continue
        run = run_summary(path)
        row_tokens = json.loads((path / "run.json").read_text())["config"]["data"]["cutoff_len"]
        global_batch = run["batch_size_per_device"] * run["grad_accum"] * (run["num_processes"] or 1)
        run["global_batch"], run["row_tokens"] = global_batch, row_tokens
        run["tokens_per_s"] = rate(run) * global_batch * row_tokens  # every row is cutoff_len long
        runs[label] = run
    one = runs["one_gpu"]
    for label, run in runs.items():
        if label != "one_gpu" and "missing" not in run and "missing" not in one:
            run["speedup_over_one_gpu"] = rate(run) / rate(one)
            run["last_loss_minus_one_gpu"] = run["last_loss"] - one["last_loss"]
            run["adapter_vs_one_gpu"] = adapter_difference(paths["one_gpu"], paths[label])
    report = {**environment("multi_gpu_train"), "missing": missing, "runs": runs}
    write_report(report, Path(args.out))
    header = ("run", "steps/s", "tokens/s", "speed-up", "peak GiB per GPU", "last loss")
    print(f"{header[0]:<10} {header[1]:>8} {header[2]:>9} {header[3]:>8} {header[4]:>20} {header[5]:>9}")
    for label, run in runs.items():
        if "missing" in run:
            print(f"{label:<10} missing")
            continue
        peaks = run["peak_gpu_memory_gib_per_process"]
        shown = "/".join(f"{p:.1f}" for p in peaks) if peaks else "-"
        speedup = f"{run.get('speedup_over_one_gpu', 1.0):.2f}x"
        print(
            f"{label:<10} {rate(run):>8.3f} {run['tokens_per_s']:>9.0f} {speedup:>8} {shown:>20} "
            f"{run['last_loss']:>9.4f}"
        )
    if missing:
        sys.exit(1)


if __name__ == "__main__":
    command_line(__doc__, prepare, compare, ["one", "ddp", "fsdp"], "bench/results/multi_gpu_train.json")
