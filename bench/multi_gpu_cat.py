"""CAT weight training on 1 GPU vs 2 GPUs (DDP through ``accelerate launch``), same global batch.

    PYTHONPATH=src python bench/multi_gpu_cat.py prepare --shape 7b --work /tmp/mgpu
    PYTHONPATH=src python -m lorasoup cat /tmp/mgpu/cat.yaml --output /tmp/mgpu/one --set train.batch_size=8
    PYTHONPATH=src accelerate launch --num_processes 2 -m lorasoup cat /tmp/mgpu/cat.yaml \
        --output /tmp/mgpu/two --set train.batch_size=4
    PYTHONPATH=src python bench/multi_gpu_cat.py compare /tmp/mgpu/one /tmp/mgpu/two --out RESULT.json

``prepare`` writes a random-weight Llama of the chosen shape (bf16) with the demo's word-level
tokenizer, two random PEFT adapters (r = 32 on q, k, v, up, down) and training data (the demo's
skill records). ``compare`` reads both runs' ``cat_weights.json`` and ``run.json``: the largest weight
difference and the training throughput of each. Both runs go through the unchanged ``lorasoup cat``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch
import yaml

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def prepare(args: argparse.Namespace) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorasoup.demo.benchmark import EXPRESSIONS, build_tokenizer, draw, pal_record

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(**SHAPES[args.shape], vocab_size=32000, max_position_embeddings=256)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(previous)
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    for i in range(2):
        lora = LoraConfig(r=32, lora_alpha=64, target_modules=TARGETS, init_lora_weights=False)
        peft_model = get_peft_model(model, lora, adapter_name=f"skill{i}")
        peft_model.save_pretrained(work / "adapters")
        model = peft_model.unload()
    # Bare expressions in the PAL format: every row has the same number of tokens, so a mean over the
    # tokens of a half batch per GPU, averaged over GPUs, is exactly the mean over the whole batch.
    records = draw(random.Random(0), args.examples, EXPRESSIONS, pal_record)
    data = work / "data.json"
    data.write_text(json.dumps(records))
    cat = {
        "base_model": str(work / "base"),
        "adapters": [{"path": str(work / "adapters" / f"skill{i}"), "name": f"skill{i}"} for i in range(2)],
        "data": {"train": [str(data)], "template": "plain", "cutoff_len": 64},
        "output": str(work / "out"),
        "train": {
            "learning_rate": 0.05,
            "max_steps": args.steps,
            "batch_size": 8,
            "dtype": "bfloat16",
            "seed": 0,
        },
    }
    (work / "cat.yaml").write_text(yaml.safe_dump(cat))
    print(
        f"prepared {work} ({args.shape}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)"
    )


def compare(args: argparse.Namespace) -> None:
    runs = {}
    for label, path in (("one_gpu", Path(args.one)), ("two_gpus", Path(args.two))):
        weights = json.loads((path / "cat_weights.json").read_text())["weights"]
        record = json.loads((path / "run.json").read_text())
        steps = record["training"]["steps"]
        runs[label] = {
            "weights": weights,
            "steps": steps,
            "train_s": record["timings_s"]["train"],
            "steps_per_s": steps / record["timings_s"]["train"],
            "batch_size_per_device": record["config"]["train"]["batch_size"],
            "last_loss": record["training"]["last_loss"],
        }
    one, two = runs["one_gpu"]["weights"], runs["two_gpus"]["weights"]
    diff = max(abs(one[g][a] - two[g][a]) for g in one for a in one[g])
    moved = max(abs(v) for g in one for v in one[g].values())
    report = {
        "benchmark": "multi_gpu_cat",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "max_abs_weight_difference": diff,
        "largest_weight": moved,
        "speedup_two_over_one": runs["two_gpus"]["steps_per_s"] / runs["one_gpu"]["steps_per_s"],
        "runs": {k: {key: v for key, v in r.items() if key != "weights"} for k, r in runs.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if os.environ.get("OUT"):
        shutil.copy(out, Path(os.environ["OUT"]) / out.name)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), json.dumps(report["runs"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    prep.add_argument("--work", default="/tmp/mgpu")
    prep.add_argument("--steps", type=int, default=30)
    prep.add_argument("--examples", type=int, default=256, help="a multiple of the global batch")
    comp = sub.add_parser("compare")
    comp.add_argument("one")
    comp.add_argument("two")
    comp.add_argument("--out", default="bench/results/multi_gpu_cat.json")
    args = p.parse_args()
    prepare(args) if args.command == "prepare" else compare(args)


if __name__ == "__main__":
    main()
