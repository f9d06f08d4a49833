"""A skill LoRA's accuracy on its own task against its training steps: how issue 18's steps are chosen.

The real-model study (``lorasoup demo --model smollm2``, docs/real-model.md) means something only when
each skill LoRA reaches 30 % on its own task, and its steps must be chosen on that accuracy alone,
never on the composite. On the H100 at 200 steps the math LoRA scored 34.5 / 26.5 / 26.5 on seeds 0-2.

This trains one skill's LoRA exactly as the study does (``demo.methods.train_lora`` with the study's
settings, only ``lora_steps`` replaced) once per step count, and scores it on the skill's own test set
with the study's scorer (same prompts, token budget, sandbox and decoding backend). The data come from
a benchmark file (``lorasoup demo --model smollm2 --save-benchmark``), so the GPU machine needs no
reasoning-gym; the math test set of a seed is the same whatever ``sizes.skill`` the file was drawn with
(``real.build_real_benchmark`` draws the test problems first). The JSON is rewritten as each step count
finishes, so a call cut off at its limit still brings back what was measured.

    python bench/skill_steps.py --model SmolLM2-135M-Instruct.Q4_1.gguf --seed 1 --steps 400 800 \\
        --set benchmark_file=.carry/smollm2-bench-12800.json.gz --set sizes.skill=12800 \\
        --set device=cuda --set eval_backend=cudagraph --work /tmp/sweep --out skill-steps-seed-1.json
    bash bench/device_real_model.sh sweep      # on the GPU machine: every seed side by side
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))  # bench/results_io.py

from results_io import write_result  # noqa: E402

from lorasoup.artifacts import package_versions  # noqa: E402
from lorasoup.config import load_config  # noqa: E402
from lorasoup.demo.device import device_facts  # noqa: E402
from lorasoup.demo.methods import load_study_model, train_lora  # noqa: E402
from lorasoup.demo.real_study import RealDemoSettings, converted_base, real_benchmark, task_specs  # noqa: E402
from lorasoup.demo.scoring import Scorer, write_records  # noqa: E402
from lorasoup.errors import LorasoupError  # noqa: E402

SKILLS = ("math", "code")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the study's base model (a .gguf, a checkpoint folder)")
    p.add_argument("--seed", type=int, default=0, help="a seed of the benchmark file")
    p.add_argument("--steps", type=int, nargs="+", required=True, help="the step counts to train")
    p.add_argument("--skill", choices=SKILLS, default="math")
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="a field of lorasoup.demo.RealDemoSettings, as `lorasoup demo --set` (repeat; the last wins)",
    )  # fmt: skip
    p.add_argument("--work", required=True, help="the converted base model, data and LoRAs go here")
    p.add_argument("--out", required=True, help="the JSON written as each step count finishes")
    args = p.parse_args(argv)
    if any(steps < 1 for steps in args.steps):
        p.error(f"--steps must be positive, got {args.steps}")
    return args


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Train and score ``args.skill``'s LoRA at each of ``args.steps``; the result also at ``args.out``."""
    from transformers import AutoTokenizer

    settings = load_config(RealDemoSettings, None, args.sets, base={"model": args.model})
    if settings.benchmark_file is None:
        raise LorasoupError("--set benchmark_file=PATH is required: the data of the study's seeds")
    work, out = Path(args.work), Path(args.out)
    base_dir = work / "base"
    base = converted_base(base_dir, settings)  # once per work folder, as a resumed study run does
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    benchmark = real_benchmark(args.seed, settings, tokenizer)
    seed_dir = work / f"seed-{args.seed}"
    records = benchmark.train[args.skill]
    data = write_records(seed_dir / "data" / f"{args.skill}.json", records)
    spec = task_specs(settings)[args.skill]
    shutil.rmtree(seed_dir / "eval", ignore_errors=True)  # scores of an earlier sweep's LoRAs
    scorer = Scorer(benchmark, tokenizer, settings, seed_dir / "eval", specs={args.skill: spec})
    result: dict[str, Any] = {
        "benchmark": "skill_steps",
        "skill": args.skill,
        "seed": args.seed,
        "model": settings.model,
        "settings": dataclasses.asdict(settings),
        "train_records": len(records),
        "test_examples": len(benchmark.test[args.skill]),
        "base_model": base,
        "env": device_facts(settings.device) | {"python": platform.python_version(), **package_versions()},
        "rows": [],
    }
    for steps in args.steps:
        chosen = dataclasses.replace(settings, lora_steps=steps)
        adapter_dir = seed_dir / f"{args.skill}-{steps}-steps"
        shutil.rmtree(adapter_dir, ignore_errors=True)  # train_lora keeps a finished LoRA: retrain
        # the Trainer's own bar is off (train_lora): say what the next minutes (CPU: tens of them) are
        print(f"seed {args.seed} {args.skill} LoRA: training {steps} steps, then scoring", flush=True)
        began = time.perf_counter()
        adapter = train_lora(
            base_dir, [(args.skill, data, None)], adapter_dir, chosen, args.seed,
            template=settings.template, cutoff_len=settings.cutoff_len,
        ).output  # fmt: skip
        train_s = time.perf_counter() - began
        began = time.perf_counter()
        method = f"{args.skill} LoRA, {steps} steps"
        accuracy = scorer.score(method, load_study_model(base_dir, adapter))
        training = json.loads((Path(adapter) / "run.json").read_text())["training"]
        row = {
            "steps": training["steps"],
            "epochs": round(steps * settings.batch_size / len(records), 3),
            "accuracy": accuracy[args.skill],
            "last_loss": training["last_loss"],
            "train_s": round(train_s, 2),
            # the Trainer's own step time past warm-up: compute-bound fp32 or not (a TF32 question)
            "step_s_median": training.get("throughput", {}).get("steady_step_seconds_median"),
            "score_s": round(time.perf_counter() - began, 2),
            # where the scoring went (generation, graph capture, tokens, backend): the first GPU
            # figures of what a real-model study row's ~20 s are made of
            "scoring": scorer.timings.get(method, {}).get(args.skill),
        }
        result["rows"].append(row)
        write_result(result, out)
        # the scorer's accuracy is a fraction; session 12's GPU run printed it as a percent (0.4 %)
        print(f"seed {args.seed} {args.skill} LoRA, {steps} steps: {100 * row['accuracy']:.1f} % "
              f"({row['epochs']} epochs; train {train_s:.0f} s)", flush=True)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sweep(args)
    except LorasoupError as exc:
        print(f"skill_steps.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
