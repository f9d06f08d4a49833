"""The user's path: ``lorasoup cat`` and ``lorasoup train`` run from YAML as a user runs them, each step
timed from its ``run.json``, against the bench's own step in the same session (see bench/README.md).

1. ``prepare``: a random-weight Llama (Llama-2-7B shape in bf16 on a GPU; ``--tiny``: the tiny shape of
   ``cat_step.py`` on the CPU) written with ``save_pretrained`` to ``--work``/base with the demo's
   word-level tokenizer; ``max(--ks)`` LoRA adapters of r = 32 (alpha 64) on q, k, v, up, down made by
   stock PEFT (``get_peft_model`` + ``save_pretrained``; ``init_lora_weights=False``, so B is not zero
   and the work is real; PEFT's default fp32 A/B); a JSON data set of rows of exactly ``--seq`` tokens
   (one epoch = ``--steps`` steps of ``--batch`` rows); one ``cat-K.yaml`` per K and ``train.yaml``,
   each loaded by the command's own config loader here, so a key the command does not take fails now.
2. ``python -m lorasoup cat cat-K.yaml`` per K (``train.compile: --compile``, default
   ``reduce-overhead`` on a GPU, ``none`` on ``--tiny``; ``data.pad_to_multiple_of`` = the row length, so
   every step has one shape), then ``python -m lorasoup train train.yaml`` (LoRA r = 32 trained with the
   Trainer; ``train.compile`` from ``--train-compile``, default ``none``, as the eager bench step it is
   compared with; ``train.logging_steps: 1``, so
   the Trainer reads the loss every step as CAT's loop does and one step's time is its own), each in its
   own process with a time limit.
3. From each ``run.json`` (``training.throughput``): the median of the steady steps' times
   (``steady_step_seconds_median``: past the first fifth of the steps, which hold compilation and CUDA
   graph capture) and the steady mean (``1 / steady_steps_per_s``, bounded by two synchronisations).
4. ``--bench-step`` (alias ``--cat-step``), in this process after the commands: ``cat_step.py``'s CAT
   variant per K in the matching mode with regional compilation (forward + backward + AdamW on θ,
   median of CUDA-event times; ``cat_stacked`` under CUDA graphs on a GPU, as ``lorasoup cat``
   trains), and ``lora_train``: the same LoRA as ``train.yaml`` (stock PEFT, fp32 A/B trainable, bf16
   autocast) as a bare forward + backward + AdamW step, eager. Each command's median ÷ its bench step
   is the ratio (the issue's target: within 10 %).

    PYTHONPATH=src python bench/user_path.py --bench-step              # GPU (H100): ~4-5 min with K = 2
    PYTHONPATH=src python bench/user_path.py --ks 2 4 --bench-step     # GPU, both K
    PYTHONPATH=src python bench/user_path.py --tiny --bench-step --out /tmp/user_path_tiny.json   # CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import cat_step  # bench/, beside this file
import torch
import yaml

from lorasoup.cat.fit import stacking_device
from lorasoup.options import FitOptions

ROOT = Path(__file__).resolve().parents[1]
RANK = 32
COMPILE_TO_BENCH_MODE = {  # train.compile -> cat_step.py's --modes name
    "none": "eager",
    "default": "compile",
    "reduce-overhead": "reduce-overhead",
    "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
}
WITHIN = 1.10  # the target: the command's step within 10 % of the bench's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (a smoke check of the path)")
    p.add_argument("--ks", type=int, nargs="+", default=[2], help="adapters per CAT run (one run per K)")
    p.add_argument("--commands", nargs="+", choices=["cat", "train"], default=["cat", "train"])
    p.add_argument("--compile", choices=sorted(COMPILE_TO_BENCH_MODE), help="train.compile of the CAT runs")
    train_help = "train.compile of the `lorasoup train` run (the Trainer's whole-model torch.compile; "
    train_help += "default none, as the eager lora_train step it is compared with)"
    p.add_argument("--train-compile", choices=sorted(COMPILE_TO_BENCH_MODE), default="none", help=train_help)
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 30; 6 with --tiny)")
    p.add_argument("--batch", type=int, help="rows per step (default 4; 2 with --tiny)")
    p.add_argument("--seq", type=int, help="tokens per row (default 256; 32 with --tiny)")
    p.add_argument("--bench-step", "--cat-step", action="store_true", help="also the bench's own steps")
    p.add_argument("--bench-steps", type=int, help="timed bench steps (default 20; 3 with --tiny)")
    p.add_argument("--work", default="/tmp/lorasoup-user-path", help="base, adapters, data, configs, runs")
    p.add_argument("--reuse", action="store_true", help="keep a prepared --work of the same plan")
    p.add_argument("--timeout", type=float, help="seconds per command (default 240; 120 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/user_path.json", help="also copied to $OUT if set")
    args = p.parse_args(argv)
    defaults = {
        "steps": (30, 6),
        "batch": (4, 2),
        "seq": (256, 32),
        "bench_steps": (20, 3),
        "timeout": (240, 120),
    }
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.compile is None:
        args.compile = "none" if args.tiny else "reduce-overhead"
    if args.steps < 2:
        p.error("--steps must be at least 2 (a steady window needs steps past the first)")
    return args


def cat_variant(args: argparse.Namespace, device: torch.device) -> str:
    """``cat_step.py``'s variant that ``lorasoup cat`` trains as: the stacked ``[W0; A]`` layer where
    the library stacks (``lorasoup.cat.fit.stacking_device``), the plain layer otherwise."""
    stacks = stacking_device(FitOptions(compile=args.compile, device=device.type))
    return "cat_stacked" if stacks is not None else "cat"


def bench_args(args: argparse.Namespace, k: int | None = None) -> argparse.Namespace:
    """``cat_step.py``'s arguments for the same shape, batch, rank and mode (regional compile)."""
    argv = ["--variants", "cat", "--modes", COMPILE_TO_BENCH_MODE[args.compile], "--compile-scope", "layers"]
    argv += ["--ks", str(k or args.ks[0]), "--rank", str(RANK), "--steps", str(args.bench_steps)]
    argv += ["--batch", str(args.batch), "--seq", str(args.seq), "--seed", str(args.seed)]
    return cat_step.parse_args(argv + (["--tiny"] if args.tiny else []))


# ---------------------------------------------------------------------------------------------------
# 1. prepare


def counting_record(start: int, words: int) -> dict[str, str]:
    """Numbers counting up modulo 100 (one token each with the demo's tokenizer): 8 in the
    instruction, ``words`` in the output, so that every row is cut at the row length."""
    count = [str((start + i) % 100) for i in range(8 + words)]
    return {"instruction": " ".join(count[:8]), "input": "", "output": " ".join(count[8:])}


def write_data(work: Path, args: argparse.Namespace, tokenizer) -> Path:
    """``data.json``: ``steps × batch`` rows, each exactly ``seq`` tokens (checked with the loader)."""
    from lorasoup.training.data import build_dataset, load_records

    path = work / "data.json"
    records = [counting_record(start, args.seq + 8) for start in range(args.steps * args.batch)]
    path.write_text(json.dumps(records))
    rows = build_dataset(load_records(path), tokenizer, template="plain", cutoff_len=args.seq)
    lengths = {len(row["input_ids"]) for row in rows.examples}
    if lengths != {args.seq} or len(rows) != len(records):
        raise SystemExit(f"data rows of {sorted(lengths)} tokens; every row must have exactly {args.seq}")
    return path


def build_base(args: argparse.Namespace, device: torch.device, vocab: int):
    """``cat_step.py``'s model (shape, bf16, SDPA), built on the device, as a checkpoint can hold it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**(cat_step.TINY if args.tiny else cat_step.FULL)}
    shape["vocab_size"] = max(shape["vocab_size"], vocab)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.max_position_embeddings = max(config.max_position_embeddings, args.seq)
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def write_adapters(model, work: Path, count: int, seed: int) -> list[Path]:
    """``count`` stock PEFT LoRAs (r 32, alpha 64, PEFT's default fp32 A/B, non-zero B), saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(count):
        torch.manual_seed(seed + 100 + i)
        config = LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules=list(cat_step.TARGETS), init_lora_weights=False
        )
        wrapped = get_peft_model(model, config, adapter_name=f"skill{i}")
        wrapped.save_pretrained(work / "adapters")  # writes adapters/skill{i}
        model = wrapped.unload()
        if hasattr(model, "peft_config"):
            del model.peft_config
        paths.append(work / "adapters" / f"skill{i}")
    return paths


def cat_config(args: argparse.Namespace, work: Path, k: int) -> dict:
    return {
        "base_model": str(work / "base"),
        "adapters": [{"path": str(work / "adapters" / f"skill{i}"), "name": f"skill{i}"} for i in range(k)],
        "data": {
            "train": [str(work / "data.json")],
            "template": "plain",
            "cutoff_len": args.seq,
            "pad_to_multiple_of": args.seq,  # one batch shape: what CUDA graphs want
        },
        "output": str(work / f"cat-{k}-out"),
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "grad_accum": 1,
            "dtype": "bfloat16",
            "compile": args.compile,
            "seed": args.seed,
            "save_steps": 0,
        },
    }


def train_config(args: argparse.Namespace, work: Path) -> dict:
    return {
        "base_model": str(work / "base"),
        "data": {"sources": [str(work / "data.json")], "template": "plain", "cutoff_len": args.seq},
        "output": str(work / "train-out"),
        "lora": {"r": RANK, "alpha": 2 * RANK, "dropout": 0.0, "target_modules": list(cat_step.TARGETS)},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "grad_accum": 1,
            "dtype": "bfloat16",
            "logging_steps": 1,  # the loss read every step, as CAT's loop does: one step's time is its own
            "save_steps": 0,
            "eval_steps": 0,
            "seed": args.seed,
            "compile": args.train_compile,
        },
    }


def write_configs(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """The YAML files, each checked by its command's own loader (an unknown key fails here)."""
    from lorasoup.cat.config import CatRunConfig
    from lorasoup.config import load_config
    from lorasoup.training.config import TrainRunConfig

    configs = {}
    plans = [(f"cat-{k}", CatRunConfig, cat_config(args, work, k)) for k in args.ks]
    plans.append(("train", TrainRunConfig, train_config(args, work)))
    for name, cls, data in plans:
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        load_config(cls, path)
        configs[name] = path
    return configs


def plan_of(args: argparse.Namespace) -> dict:
    """What a prepared --work holds; --reuse keeps it only when this matches."""
    return {
        "shape": "tiny" if args.tiny else "7b",
        "adapters": max(args.ks),
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "seed": args.seed,
    }


def prepare(args: argparse.Namespace, device: torch.device) -> dict:
    from lorasoup.demo.benchmark import build_tokenizer

    work = Path(args.work)
    stamp = work / "prepared.json"
    began = time.perf_counter()
    reused = args.reuse and stamp.is_file() and json.loads(stamp.read_text()) == plan_of(args)
    if reused:
        for old in work.glob("*-out*"):  # earlier runs' outputs and checkpoints
            shutil.rmtree(old, ignore_errors=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        tokenizer = build_tokenizer()
        model = build_base(args, device, len(tokenizer))
        model.save_pretrained(work / "base")
        tokenizer.save_pretrained(work / "base")
        saved_s = time.perf_counter() - began
        write_adapters(model, work, max(args.ks), args.seed)
        write_data(work, args, tokenizer)
        del model
        free(device)
        stamp.write_text(json.dumps(plan_of(args)))
        print(f"prepared {work} in {time.perf_counter() - began:.1f} s (base saved in {saved_s:.1f} s)")
    configs = write_configs(args, work)
    return {"work": str(work), "reused": reused, "seconds": time.perf_counter() - began, "configs": configs}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# 2. and 3. the commands, and what their run.json says


def run_command(command: str, config: Path, log: Path, timeout: float) -> dict:
    """``python -m lorasoup COMMAND CONFIG`` in its own process (stdout and stderr to ``log``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():  # one thread, as this process's bench steps on the CPU
        env["OMP_NUM_THREADS"] = "1"
    argv = [sys.executable, "-m", "lorasoup", command, str(config)]
    began = time.perf_counter()
    with log.open("w") as handle:
        try:
            rc = subprocess.run(
                argv, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return {"argv": argv[1:], "rc": rc, "wall_s": time.perf_counter() - began, "log": str(log)}


def from_run_json(output: Path) -> dict:
    """Per-step times and the rest of what one run recorded."""
    record = json.loads((output / "run.json").read_text())
    training, throughput = record["training"], record["training"].get("throughput") or {}
    seconds = throughput.get("step_seconds")
    if seconds is None:
        raise ValueError(f"{output}/run.json has no training.throughput.step_seconds (an older lorasoup?)")
    steady_from = throughput["steady_from_step"]
    first = training["steps"] - len(seconds)  # step_seconds[i] is step first + 1 + i
    steady = [s for i, s in enumerate(seconds) if first + 1 + i > steady_from]
    rate = throughput.get("steady_steps_per_s")
    return {
        "steps": training["steps"],
        "steady_from_step": steady_from,
        "ms_per_step_median": 1e3 * throughput["steady_step_seconds_median"],
        "ms_per_step_min": 1e3 * min(steady),
        "ms_per_step_max": 1e3 * max(steady),
        "ms_per_step_steady_mean": 1e3 / rate if rate else None,
        "ms_all": [1e3 * s for s in seconds],
        "first_steps_s": seconds[: max(1, steady_from - first)],  # compilation, capture, start-up
        "first_loss": training.get("first_loss"),
        "last_loss": training.get("last_loss"),
        "peak_gpu_gib": (record.get("resources") or {}).get("peak_gpu_memory_gib"),
        "timings_s": record.get("timings_s"),
        "versions": record.get("versions"),
    }


def run_one(name: str, command: str, config: Path, args: argparse.Namespace) -> dict:
    loaded = yaml.safe_load(config.read_text())
    row = {"run": name, "command": command, "config": str(config)}
    row["compile"] = loaded["train"].get("compile", "none")
    row.update(run_command(command, config, Path(args.work) / f"{name}.log", args.timeout))
    try:
        if row["rc"] != 0:
            raise RuntimeError(f"exit {row['rc']}" + (" (time limit)" if row["rc"] == 124 else ""))
        row.update(from_run_json(Path(loaded["output"])))
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"
        tail = Path(row["log"]).read_text(errors="replace").splitlines()[-25:]
        row["log_tail"] = tail
        print("\n".join(tail), file=sys.stderr)
    median = row.get("ms_per_step_median", math.nan)
    print(
        f"  {name:<8} exit {row['rc']}  {row['wall_s']:6.1f} s  {median:8.2f} ms/step (steady median)",
        flush=True,
    )
    return row


# ---------------------------------------------------------------------------------------------------
# 4. the bench's own steps, in this process


def lora_train_row(model, batches, args: argparse.Namespace, device: torch.device) -> dict:
    """The LoRA of ``train.yaml`` as a bare step: stock PEFT (fp32 A/B, trainable) on the bf16 base,
    bf16 autocast as the Trainer's ``bf16=True``, forward + backward + AdamW, eager."""
    from peft import LoraConfig, get_peft_model

    row = {"variant": "lora_train", "kind": "lora_train", "k": 1, "mode": "eager"}
    row["note"] = f"stock PEFT r={RANK} (fp32 A/B, trainable), bf16 autocast, AdamW; Trainer's maths only"
    row["resident_gib"] = cat_step.reset_memory(device)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=list(cat_step.TARGETS))
    wrapped = get_peft_model(model, config)
    try:
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=3e-4)  # adamw_torch, the Trainer's default optim

        def step(ids: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        row.update(cat_step.measure(step, batches, args.warmup, args.steps, device))
        row["compile_s"] = None
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
        traceback.print_exc()
    finally:
        wrapped.unload()
        if hasattr(model, "peft_config"):
            del model.peft_config
        model.requires_grad_(False)
        free(device)
    print(f"  {'lora_train':>16} {'eager':<27} {row.get('ms_median', math.nan):9.2f} ms", flush=True)
    return row


def bench_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """``cat_step.py``'s CAT per K (the CAT runs' mode, regional compile) and ``lora_train``."""
    common = bench_args(args)
    model = cat_step.build_base(common, device)
    batches = cat_step.make_batches(common, model.config.vocab_size, device)
    rows = []
    try:
        if "cat" in args.commands:
            variant = cat_variant(args, device)
            for k in args.ks:
                try:
                    rows += cat_step.run_variant(variant, k, model, batches, bench_args(args, k), device)
                except Exception as err:
                    traceback.print_exc()
                    rows.append({"variant": f"{variant}_{k}", "kind": variant, "k": k, "error": repr(err)})
        if "train" in args.commands:
            rows.append(lora_train_row(model, batches, common, device))
    finally:
        del model
        free(device)
    return rows


def compare(runs: list[dict], bench: list[dict]) -> list[dict]:
    """Each command's steady median ÷ its bench step (CAT K in the same mode; ``lora_train``)."""
    by_name = {r["variant"]: r for r in bench if r.get("ms_median") is not None}
    cat_rows = {
        r["k"]: r for r in bench if r.get("kind", "").startswith("cat") and r.get("ms_median") is not None
    }
    ratios = []
    for run in runs:
        ref = (
            cat_rows.get(int(run["run"].split("-")[1]))
            if run["command"] == "cat"
            else by_name.get("lora_train")
        )
        if ref is None or run.get("ms_per_step_median") is None:
            continue
        ratio = run["ms_per_step_median"] / ref["ms_median"]
        mean = run.get("ms_per_step_steady_mean")
        ratios.append({
            "run": run["run"],
            "bench": ref["variant"],
            "bench_mode": ref["mode"],
            "command_ms": run["ms_per_step_median"],
            "bench_ms": ref["ms_median"],
            "ratio": ratio,
            "ratio_steady_mean": mean / ref["ms_median"] if mean else None,
            "within_10_percent": ratio <= WITHIN,
        })  # fmt: skip
    return ratios


# ---------------------------------------------------------------------------------------------------


def header(args: argparse.Namespace, device: torch.device) -> dict:
    import accelerate
    import peft
    import transformers

    versions = {m.__name__: m.__version__ for m in (torch, transformers, peft, accelerate)}
    return {
        "benchmark": "user_path",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": versions | {"cuda": torch.version.cuda, "python": sys.version.split()[0]},
        "model": {**(cat_step.TINY if args.tiny else cat_step.FULL), "dtype": "bf16", "attn": "sdpa"},
        "adapters": {"rank": RANK, "alpha": 2 * RANK, "targets": list(cat_step.TARGETS), "made_by": "peft"},
        "batch": {"rows": args.batch, "tokens": args.seq},
        "args": {k: v for k, v in vars(args).items()},
        "timing": (
            "commands: run.json training.throughput.step_seconds (host time between step ends; the loss "
            "is read every step), median past steady_from_step; bench: "
            + ("CUDA events per step on an idle queue, median" if device.type == "cuda" else "CPU wall clock")
        ),
    }


def table(result: dict) -> str:
    lines = [f"{'run':<10} {'compile':<17} {'exit':>4} {'ms/step':>9} {'mean ms':>9} {'wall s':>7}"]
    for r in result["runs"]:
        mean = r.get("ms_per_step_steady_mean")
        median = r.get("ms_per_step_median", math.nan)
        lines.append(
            f"{r['run']:<10} {str(r['compile'])[:17]:<17} {r['rc']:>4} {median:9.2f}"
            f" {mean if mean is not None else math.nan:9.2f} {r['wall_s']:7.1f}"
        )
    for c in result.get("ratios", []):
        verdict = "within 10 %" if c["within_10_percent"] else "NOT within 10 %"
        lines.append(
            f"{c['run']} / bench {c['bench']} ({c['bench_mode']}): {c['command_ms']:.2f} ms / "
            f"{c['bench_ms']:.2f} ms = {c['ratio']:.3f}x  {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = cat_step.device_of(args)
    result = header(args, device)
    prepared = prepare(args, device)
    result["prepare"] = {k: v for k, v in prepared.items() if k != "configs"}
    result["runs"], result["bench"] = [], []
    for name, config in prepared["configs"].items():
        command = name.split("-")[0]
        if command in args.commands:
            result["runs"].append(run_one(name, command, config, args))
            cat_step.write_json(result, args.out, quiet=True)
    if args.bench_step:
        result["bench"] = bench_rows(args, device)
        result["ratios"] = compare(result["runs"], result["bench"])
    print("\n" + table(result))
    cat_step.write_json(result, args.out)
    bad = [r["run"] for r in result["runs"] if "error" in r]
    bad += [r["variant"] for r in result["bench"] if cat_step.failed(r)]
    for name in bad:
        print(f"FAILED: {name}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
