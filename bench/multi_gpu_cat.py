"""CAT weight training on 1 GPU vs 2 GPUs (DDP through ``accelerate launch``), same global batch.

    PYTHONPATH=src python bench/multi_gpu_cat.py prepare --shape 7b --work /tmp/mgpu
    PYTHONPATH=src python -m lorasoup cat /tmp/mgpu/cat.yaml --output /tmp/mgpu/one --set train.batch_size=8
    PYTHONPATH=src accelerate launch --num_processes 2 -m lorasoup cat /tmp/mgpu/cat.yaml \
        --output /tmp/mgpu/two --set train.batch_size=4
    PYTHONPATH=src python bench/multi_gpu_cat.py compare /tmp/mgpu/one /tmp/mgpu/two --out RESULT.json

``prepare`` writes a random-weight Llama of the chosen shape (bf16; ``--layers`` keeps the width and
changes the depth) with the demo's word-level tokenizer, two random PEFT adapters (r = 32 on q, k, v,
up, down) and training data (the demo's skill records). ``compare`` reads both runs' ``cat_weights.json``
and ``run.json``: the largest weight difference, and each run's throughput and peak GPU memory. Both
runs go through the unchanged ``lorasoup cat``. ``bench/multi_gpu_train.py`` reuses ``prepare`` and the
readers below for ``lorasoup train``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # bench/results_io.py, when run from anywhere

from results_io import write_result

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
    shape = {**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})}
    config = LlamaConfig(**shape, vocab_size=32000, max_position_embeddings=256)
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


def run_summary(path: Path) -> dict:
    """Throughput, processes and peak GPU memory of one ``lorasoup cat`` or ``lorasoup train`` run.

    ``steps_per_s`` is over the whole ``train`` timing (set-up included: the Accelerator or Trainer,
    moving the model to the GPU, DDP's first broadcast); ``steady_steps_per_s`` leaves out the first
    fifth of the steps (``lorasoup.resources.StepClock``), None for runs recorded before it existed.
    """
    record = json.loads((path / "run.json").read_text())
    steps, train_s = record["training"]["steps"], record["timings_s"]["train"]
    resources = record.get("resources", {})
    return {
        "steps": steps,
        "train_s": train_s,
        "steps_per_s": steps / train_s,
        "steady_steps_per_s": (record["training"].get("throughput") or {}).get("steady_steps_per_s"),
        "num_processes": resources.get("num_processes"),
        "batch_size_per_device": record["config"]["train"]["batch_size"],
        "grad_accum": record["config"]["train"].get("grad_accum", 1),
        "peak_gpu_memory_gib": resources.get("peak_gpu_memory_gib"),
        "peak_gpu_memory_gib_per_process": resources.get("peak_gpu_memory_gib_per_process"),
        "last_loss": record["training"]["last_loss"],
        "timings_s": record["timings_s"],
    }


def rate(run: dict) -> float:
    """The steady steps/s where recorded, else steps/s over the whole train timing."""
    return run["steady_steps_per_s"] or run["steps_per_s"]


def environment(benchmark: str) -> dict:
    return {
        "benchmark": benchmark,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }


def write_report(report: dict, out: Path) -> None:
    """``out`` (and a copy in ``$OUT``, which the device machine sends back), then one line per part."""
    write_result(report, out)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), json.dumps(report["runs"]))


def compare(args: argparse.Namespace) -> None:
    paths = {"one_gpu": Path(args.one), "two_gpus": Path(args.two)}
    runs = {label: run_summary(path) for label, path in paths.items()}
    one, two = (json.loads((paths[k] / "cat_weights.json").read_text())["weights"] for k in paths)
    diff = max(abs(one[g][a] - two[g][a]) for g in one for a in one[g])
    moved = max(abs(v) for g in one for v in one[g].values())
    report = {
        **environment("multi_gpu_cat"),
        "max_abs_weight_difference": diff,
        "largest_weight": moved,
        "speedup_two_over_one": rate(runs["two_gpus"]) / rate(runs["one_gpu"]),
        "runs": runs,
    }
    write_report(report, Path(args.out))


def command_line(doc: str, prepare: Callable, compare: Callable, runs: list[str], out: str) -> None:
    """``prepare`` or ``compare RUN... --out FILE`` (the run directories named by ``runs``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    prep.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    prep.add_argument("--work", default="/tmp/mgpu")
    prep.add_argument("--steps", type=int, default=30)
    prep.add_argument("--examples", type=int, default=256, help="a multiple of the global batch")
    comp = sub.add_parser("compare")
    for run in runs:
        comp.add_argument(run)
    comp.add_argument("--out", default=out)
    args = p.parse_args()
    prepare(args) if args.command == "prepare" else compare(args)


if __name__ == "__main__":
    command_line(__doc__, prepare, compare, ["one", "two"], "bench/results/multi_gpu_cat.json")
