"""``lorasoup eval``'s backends on GSM-Hard in one process: ``cudagraph`` against ``hf``, same prompts.

What ``lorasoup eval --task gsm-hard --data DIR --backend NAME`` does, minus the files: the config goes
through ``EvalRunConfig``'s loader, the task builds the paper's 8-shot PAL prompt for each problem, and
each backend comes from the library's registry (``evaluation.runner.load_generator``: the model is
loaded as that backend loads it). Each backend then gets one untimed warm-up call on the first batch
of prompts (the ``cudagraph`` backend captures its graphs there; ``warmup_s``), then
``evaluation.runner.run_examples`` generates and scores every problem exactly as an eval run does, and
its ``tokens_per_s`` (new tokens ÷ generation seconds) is the number reported. Greedy decoding, so
both backends should write the same text for every problem: ``identical`` counts them, and the exit
code is 1 unless all are (or a backend failed).

On a CPU the ``cudagraph`` backend runs its decoding steps eagerly (no graphs): the comparison and
the identical-text check still run, but its speed is not the GPU's.

    PYTHONPATH=src:$ASSETS/site python bench/eval_backends.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data .carry/lora-soups --limit 512 --batch-size 128                       # GPU
    PYTHONPATH=src python bench/eval_backends.py --model smollm2-135m --limit 4 --max-new-tokens 32  # CPU
    PYTHONPATH=src python bench/eval_backends.py --tiny --out /tmp/eval_backends_tiny.json   # CPU, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/results_io.py, when run from anywhere

from results_io import write_result

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("LORA_SOUPS_DATA", str(ROOT.parent / "shared/data/lora-soups/data"))
TINY = dict(
    hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="as lorasoup eval --model: alias, dir, .gguf")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama and BPE tokenizer (CPU, seconds)")
    p.add_argument("--data", default=DEFAULT_DATA, help="the LoRA Soups data/ folder (GSM-Hard + demos)")
    p.add_argument("--limit", type=int, help="first N problems (default 512; 4 with --tiny)")
    p.add_argument("--batch-size", type=int, help="prompts per generation batch (default 128; 4 with --tiny)")
    p.add_argument("--max-new-tokens", type=int, help="default: the task's (256); 16 with --tiny")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--backends", nargs="+", default=["hf", "cudagraph"], help="the first is the baseline")
    p.add_argument("--work", help="where --tiny writes its model (default: a temporary folder)")
    p.add_argument("--out", default="bench/results/eval_backends.json", help="also copied to $OUT if set")
    args = p.parse_args(argv)
    for name, full, tiny in (("limit", 512, 4), ("batch_size", 128, 4), ("max_new_tokens", None, 16)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if len(set(args.backends)) != len(args.backends) or len(args.backends) < 2:
        p.error("--backends: two or more different backends (the first is the baseline)")
    return args


def tiny_model(folder: Path, texts: list[str], max_positions: int) -> str:
    """A random tiny Llama (fp32) and a byte-level BPE tokenizer trained on ``texts``, saved as a
    checkpoint directory that ``lorasoup eval --model`` takes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    longest = max(len(tokenizer(text)["input_ids"]) for text in texts)
    config = LlamaConfig(
        **TINY,
        vocab_size=len(tokenizer),
        max_position_embeddings=longest + max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def eval_config(args: argparse.Namespace, model: str):
    """The run config through ``lorasoup eval``'s own loader (the CLI's flags as typed values)."""
    from lorasoup.config import load_config
    from lorasoup.evaluation.config import EvalRunConfig

    values = {
        "model": model,
        "task": "gsm-hard",
        "data": [args.data],
        "limit": args.limit,
        "dtype": args.dtype,
        "device": args.device,
        "generation.batch_size": args.batch_size,
        "generation.max_new_tokens": args.max_new_tokens,
    }
    return load_config(EvalRunConfig, values={k: v for k, v in values.items() if v is not None})


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_backend(config, name: str, task, examples, settings) -> tuple[dict, list[str]]:
    """Load through the registry, warm up on the first batch, then generate and score every problem."""
    from lorasoup.evaluation.results import summarise
    from lorasoup.evaluation.runner import load_generator, run_examples

    row: dict = {"backend": name}
    began = time.perf_counter()
    generate_fn, tokenizer, facts = load_generator(dataclasses.replace(config, backend=name))
    row["load_s"] = time.perf_counter() - began
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    prompts = [task.prompt(example, tokenizer) for example in examples]
    first = sorted(prompts, key=len, reverse=True)[: settings.batch_size]  # run_examples' first chunk
    began = time.perf_counter()
    generate_fn(first, settings)
    sync()
    row["warmup_s"] = time.perf_counter() - began
    results, throughput = run_examples(
        generate_fn, tokenizer, task, examples, settings, sandbox=config.sandbox
    )
    sync()
    summary = summarise(results, task.spec)
    row.update(
        tokens_per_s=throughput["tokens_per_s"],
        generate_s=throughput["generate_s"],
        score_s=throughput["score_s"],
        new_tokens=throughput["new_tokens"],
        prompt_tokens=throughput["prompt_tokens"],
        examples=throughput["examples"],
        accuracy=summary.get("accuracy"),
        facts={k: v for k, v in facts.items() if isinstance(v, (str, int, float, bool)) or v is None},
    )
    row["graphs"] = name == "cudagraph" and str(facts.get("device", "")).startswith("cuda")
    if torch.cuda.is_available():
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["prompt_tokens_mean"] = row["prompt_tokens"] / max(1, len(results))
    return row, [r.generation for r in results]


def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def compare(baseline: dict, other: dict, ids: list[str], base_texts: list[str], texts: list[str]) -> dict:
    """Speed ratio and identical generations of ``other`` against ``baseline``."""
    differ = [i for i, (a, b) in enumerate(zip(base_texts, texts, strict=True)) if a != b]
    return {
        "backend": other["backend"],
        "baseline": baseline["backend"],
        "tokens_per_s_ratio": other["tokens_per_s"] / baseline["tokens_per_s"]
        if baseline["tokens_per_s"]
        else None,
        "generate_s_ratio": baseline["generate_s"] / other["generate_s"] if other["generate_s"] else None,
        "identical": len(texts) - len(differ),
        "total": len(texts),
        "all_identical": not differ,
        "differing": [
            {"id": ids[i], "common_prefix_chars": common_prefix(base_texts[i], texts[i])} for i in differ[:20]
        ],
    }


def header(args: argparse.Namespace, model: str, settings) -> dict:
    import peft
    import transformers

    on_gpu = torch.cuda.is_available()
    versions = {m.__name__: m.__version__ for m in (torch, transformers, peft)}
    return {
        "benchmark": "eval_backends",
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "versions": versions | {"cuda": torch.version.cuda, "python": sys.version.split()[0]},
        "model": model,
        "task": "gsm-hard (8-shot PAL prompt, the LoRA Soups reference's)",
        "settings": dataclasses.asdict(settings),
        "args": vars(args),
        "note": None if on_gpu else "CPU: the cudagraph backend steps eagerly (no CUDA graphs)",
    }


def main(argv: list[str] | None = None) -> int:
    from lorasoup.evaluation.runner import task_settings
    from lorasoup.evaluation.tasks import Task, get_task_spec, resolve_inputs

    args = parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # a small shared CPU: OpenMP threads only add noise
    spec = get_task_spec("gsm-hard")
    inputs = resolve_inputs(spec, [args.data])
    task = Task.from_inputs(spec, inputs)
    model = args.model
    scratch = None
    if args.tiny:
        scratch = Path(args.work or tempfile.mkdtemp(prefix="eval-backends-tiny-"))
        questions = [task.prompt(e) for e in task.load(inputs.data, limit=args.limit)]
        model = tiny_model(scratch, questions, args.max_new_tokens + 16)
    config = eval_config(args, model)
    settings = config.generation.apply(task_settings(task))
    examples = task.load(inputs.data, limit=config.limit)
    result = header(args, model, settings) | {"rows": [], "comparisons": []}
    result["prompt_start"] = task.prompt(examples[0])[:200]  # the 8-shot PAL header comes first
    texts: dict[str, list[str]] = {}
    for name in args.backends:
        try:
            row, texts[name] = run_backend(config, name, task, examples, settings)
        except Exception as err:  # the other backend's numbers still come back
            traceback.print_exc()
            row = {"backend": name, "error": f"{type(err).__name__}: {err}"[:2000]}
        result["rows"].append(row)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        nan = float("nan")
        print(
            f"  {name:<10} {row.get('tokens_per_s', nan):9.1f} tokens/s  generate "
            f"{row.get('generate_s', nan):7.2f} s  warm-up {row.get('warmup_s', nan):6.2f} s"
            f"  accuracy {row.get('accuracy')}  {row.get('error', '')[:120]}",
            flush=True,
        )
        write_result(result, args.out)
    baseline = result["rows"][0]
    ids = [e.id for e in examples]
    for row in result["rows"][1:]:
        if "error" not in row and "error" not in baseline:
            comparison = compare(baseline, row, ids, texts[baseline["backend"]], texts[row["backend"]])
            result["comparisons"].append(comparison)
            ratio, same = comparison["tokens_per_s_ratio"], comparison["identical"]
            print(
                f"{row['backend']} / {baseline['backend']}: {ratio:.2f}x tokens/s, "
                f"{same} of {comparison['total']} generations identical"
            )
    print("wrote " + " and ".join(map(str, write_result(result, args.out))))
    if scratch is not None and args.work is None:
        shutil.rmtree(scratch, ignore_errors=True)
    failed = any("error" in r for r in result["rows"]) or not all(
        c["all_identical"] for c in result["comparisons"]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
