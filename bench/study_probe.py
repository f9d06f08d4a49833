"""Where a real-model study seed's GPU time goes, measured in one process (issue 18's planning).

The study (docs/real-model.md) trains about 2,000 LoRA steps a seed and scores some 17 rows on three
or four tasks. This probe times both halves on a model of SmolLM2-135M-Instruct's shape (30 layers,
width 576, 9 heads of which 3 key-value, vocabulary 49,152) with random weights, so it needs no
weights: it fits the first device call of a session, which carries only part 0 of the GGUF.

1. **Training**: the study's own LoRA training (``demo.methods.train_lora``: r = 8 on every linear
   module, the Trainer, batches of 16 rows cut to 256 tokens) for ``--train-steps`` steps, in full
   fp32 and with ``train.tf32`` (TF32 tensor cores): the Trainer's median step past warm-up.
2. **Scoring**: greedy decoding as the study's scorer decodes (the cudagraph backend, one batch of
   ``--batch`` prompts of ``--prompt-tokens`` tokens, ``--new-tokens`` new ones, EOS ignored so every
   row runs to the end) for the base, the base with the trained LoRA as PEFT keeps it (unmerged,
   as the study scores every adapter row now), and the LoRA merged into the weights: new tokens/s
   after one warm-up call (graph capture), and how many generations merging left identical.

    PYTHONPATH=src python bench/study_probe.py                     # GPU, about 2 minutes on an H100
    PYTHONPATH=src python bench/study_probe.py --tiny --work /tmp/probe   # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, when run from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from results_io import write_result

SMOLLM2 = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True,
)  # fmt: skip
WORDS = [f"w{i}" for i in range(600)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model and a few steps (CPU, seconds)")
    p.add_argument("--train-steps", type=int, help="steps per training (default 40; tiny 4)")
    p.add_argument("--batch", type=int, help="prompts decoded together (default 200, the study's; tiny 4)")
    p.add_argument("--prompt-tokens", type=int, default=100, help="tokens per prompt (the math task's ~100)")
    p.add_argument("--new-tokens", type=int, help="new tokens per prompt (default 144, math's; tiny 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="where the model, data and LoRAs go (default: a temporary folder)")
    p.add_argument("--out", default="bench/results/study_probe.json", help="also copied to $OUT if set")
    args = p.parse_args(argv)
    for name, full, tiny in (("train_steps", 40, 4), ("batch", 200, 4), ("new_tokens", 144, 8)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def write_base(folder: Path, shape: dict, seed: int) -> Path:
    """A random Llama of ``shape`` and a word-level tokenizer (one token per word of ``WORDS``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    config = LlamaConfig(
        **shape, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def words(generator: torch.Generator, count: int) -> str:
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (count,), generator=generator).tolist())


def write_records(path: Path, rows: int, seed: int) -> Path:
    """Records longer than the study's 256-token cut, so every row is a full 256 tokens."""
    generator = torch.Generator().manual_seed(seed)
    records = [{"instruction": words(generator, 60), "output": words(generator, 260)} for _ in range(rows)]
    path.write_text(json.dumps(records))
    return path


def train(base: Path, data: Path, out: Path, args: argparse.Namespace, tf32: bool) -> dict:
    from lorasoup.demo.methods import train_lora
    from lorasoup.demo.real_study import RealDemoSettings

    settings = RealDemoSettings(
        lora_steps=args.train_steps, batch_size=4 if args.tiny else 16, lora_rank=8,
        device="cuda" if torch.cuda.is_available() else "cpu", tf32=tf32,
    )  # fmt: skip
    began = time.perf_counter()
    adapter = train_lora(
        base, [("probe", str(data), None)], out, settings, args.seed, template="plain", cutoff_len=256
    )
    seconds = time.perf_counter() - began
    training = json.loads((Path(adapter.output) / "run.json").read_text())["training"]
    return {
        "tf32": tf32,
        "tf32_applied": tf32 and torch.cuda.is_available(),  # train.tf32 is ignored on a CPU
        "steps": training["steps"],
        "step_s_median": training.get("throughput", {}).get("steady_step_seconds_median"),
        "train_s": round(seconds, 2),
        "adapter": str(adapter.output),
    }


def decode(model, tokenizer, prompts: list[str], args: argparse.Namespace) -> tuple[dict, list[str]]:
    """One warm-up call (graph capture), then the timed one: the study's scorer's backend and batch."""
    from lorasoup.evaluation.backends import model_generator
    from lorasoup.evaluation.generate import GenerationSettings

    settings = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=args.batch, ignore_eos=True)
    generate = model_generator("cudagraph", model, tokenizer)
    began = time.perf_counter()
    generate(prompts, settings)
    sync()
    warmup_s = time.perf_counter() - began
    began = time.perf_counter()
    generations = generate(prompts, settings)
    sync()
    seconds = time.perf_counter() - began
    new_tokens = sum(g.new_tokens for g in generations)
    row = {"warmup_s": round(warmup_s, 3), "generate_s": round(seconds, 3), "new_tokens": new_tokens}
    row["tokens_per_s"] = round(new_tokens / seconds, 1)
    row["ms_per_step"] = round(1000 * seconds / args.new_tokens, 2)
    return row, [g.text for g in generations]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def scoring(base: Path, adapter: str, args: argparse.Namespace) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(base)
    generator = torch.Generator().manual_seed(args.seed + 1)
    prompts = [words(generator, args.prompt_tokens - 1) for _ in range(args.batch)]  # BOS makes the count
    rows, texts = {}, {}

    def load(with_adapter: bool):
        model = AutoModelForCausalLM.from_pretrained(base).to(device)
        return (PeftModel.from_pretrained(model, adapter) if with_adapter else model).eval()

    for name, build in (
        ("base", lambda: load(False)),
        ("lora_unmerged", lambda: load(True)),
        ("lora_merged", lambda: load(True).merge_and_unload()),
    ):
        rows[name], texts[name] = decode(build(), tokenizer, prompts, args)
    same = sum(a == b for a, b in zip(texts["lora_unmerged"], texts["lora_merged"], strict=True))
    rows["merged_identical"] = f"{same} of {len(prompts)}"
    rows["unmerged_vs_base"] = round(rows["base"]["tokens_per_s"] / rows["lora_unmerged"]["tokens_per_s"], 2)
    rows["merged_vs_unmerged"] = round(
        rows["lora_merged"]["tokens_per_s"] / rows["lora_unmerged"]["tokens_per_s"], 2
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    from lorasoup.artifacts import package_versions
    from lorasoup.demo.device import device_facts

    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="study-probe-"))
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {
        "benchmark": "study_probe",
        "shape": "tiny" if args.tiny else "smollm2-135m (random weights)",
        "args": vars(args),
        "env": device_facts(device) | package_versions(),  # as skill_steps.py records it
    }
    base = write_base(work / "base", TINY if args.tiny else SMOLLM2, args.seed)
    data = write_records(work / "records.json", rows=16 * args.train_steps, seed=args.seed)
    result["training"] = [
        train(base, data, work / f"lora-{tag}", args, tf32) for tag, tf32 in (("fp32", False), ("tf32", True))
    ]
    steps = [row["step_s_median"] for row in result["training"]]
    if all(steps):
        result["tf32_speedup"] = round(steps[0] / steps[1], 2)
    write_result(result, args.out)  # the training's figures survive a scoring that fails
    result["scoring"] = scoring(base, result["training"][0]["adapter"], args)
    print(f"training step (median): fp32 {steps[0]} s, tf32 {steps[1]} s; scoring ms/step:",
          {k: v["ms_per_step"] for k, v in result["scoring"].items() if isinstance(v, dict)})  # fmt: skip
    print("wrote " + " and ".join(map(str, write_result(result, args.out))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
