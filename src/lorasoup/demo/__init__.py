"""The embedded default: a small CAT composition that needs no download and runs in about a minute.

Everything is built locally from a seed: a byte-level BPE tokenizer (``tokenizers``), a tiny Llama
(``transformers``, from a config), two synthetic skills (A: add two numbers, B: copy a word list in
reverse), one PEFT LoRA per skill, and a CAT composition trained on the mix of both skills' data.
The table compares held-out losses per skill; then the exported adapter is reloaded with stock PEFT
and must reproduce the CAT logits. It shows the pipeline end to end, not the paper's claim: that is
what the demo-study issue and the GPU study are for.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

from lorasoup.cat.config import AdapterRef, CatRunConfig, DataConfig, TrainOptions

WORDS = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "star", "rock"]


@dataclass
class DemoRow:
    name: str
    loss_a: float
    loss_b: float
    loss_mix: float


@dataclass
class DemoSummary:
    rows: list[DemoRow]
    export_max_abs_diff: float
    cat_output: Path


def skill_records(skill: str, count: int, rng: random.Random) -> list[dict[str, str]]:
    records = []
    for _ in range(count):
        if skill == "add":
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            records.append({"instruction": f"add {a} and {b}", "output": str(a + b)})
        else:
            words = rng.sample(WORDS, 3)
            records.append({"instruction": "reverse " + " ".join(words), "output": " ".join(reversed(words))})
    return records


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus`` with the ``tokenizers`` library (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_base(directory: Path, corpus: list[str], seed: int) -> None:
    """A 2-layer Llama and a BPE tokenizer trained on ``corpus``, saved as a normal model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(corpus, vocab_size=400)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def train_skill_lora(
    base_dir: Path, records: list[dict[str, str]], out_dir: Path, seed: int, steps: int
) -> None:
    """A small PEFT LoRA (r=8 on attention and MLP projections), trained with AdamW."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasoup.training.data import build_dataset, collate

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    dataset = build_dataset(records, tokenizer, template="plain", cutoff_len=64)
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=16,
        shuffle=True,
        collate_fn=functools.partial(collate, pad_token_id=tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(seed),
    )
    model.train()
    done = 0
    while done < steps:
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done >= steps:
                break
    model.save_pretrained(out_dir)


def mean_loss(model: torch.nn.Module, tokenizer: object, records: list[dict[str, str]]) -> float:
    from lorasoup.training.data import build_dataset, collate

    dataset = build_dataset(records, tokenizer, template="plain", cutoff_len=64)
    batch = collate(list(dataset), tokenizer.pad_token_id)  # type: ignore[attr-defined]
    with torch.no_grad():
        return float(model(**batch).loss)


def run_demo(
    output: Path,
    *,
    seed: int = 0,
    overwrite: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
) -> DemoSummary:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasoup.cat.run import run_cat

    output.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train = {s: skill_records(s, 400, rng) for s in ("add", "reverse")}
    held_out = {s: skill_records(s, 64, rng) for s in ("add", "reverse")}
    base_dir = output / "base"
    corpus = [f"{r['instruction']} {r['output']}" for rs in train.values() for r in rs]
    build_tiny_base(base_dir, [*corpus, "### Instruction: ### Response: Below is an instruction"], seed)
    for skill, records in train.items():
        train_skill_lora(base_dir, records, output / f"lora-{skill}", seed, steps=250)

    mix_path = output / "mix.json"
    mix_path.write_text(json.dumps(train["add"][:100] + train["reverse"][:100]))
    config = CatRunConfig(
        base_model=str(base_dir),
        adapters=[AdapterRef(str(output / f"lora-{skill}"), name=skill) for skill in train],
        data=DataConfig(train=[str(mix_path)], template="plain", cutoff_len=64),
        output=str(output / "cat"),
        train=TrainOptions(learning_rate=5e-2, epochs=2, batch_size=16, seed=seed),
        overwrite=overwrite,
    )
    result = run_cat(config, progress=progress)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    mixed = held_out["add"] + held_out["reverse"]

    def row(name: str, model: torch.nn.Module) -> DemoRow:
        model.eval()
        return DemoRow(
            name, *(mean_loss(model, tokenizer, rs) for rs in (held_out["add"], held_out["reverse"], mixed))
        )

    rows = [row("base", AutoModelForCausalLM.from_pretrained(base_dir))]
    for skill in train:
        rows.append(
            row(
                f"LoRA {skill}",
                PeftModel.from_pretrained(
                    AutoModelForCausalLM.from_pretrained(base_dir), output / f"lora-{skill}"
                ),
            )
        )
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), result.output)
    rows.append(row("CAT (exported)", exported))

    ids = torch.randint(4, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (result.composition.model(input_ids=ids).logits - exported(input_ids=ids).logits).abs().max()
    return DemoSummary(rows=rows, export_max_abs_diff=float(diff), cat_output=result.output)
