"""Candidates scored per second by the weight search: one batched forward per population vs LoraHub's
one forward per candidate (see docs/search.md, "Speed").

One process, one base model (Llama-2-7B shape, random bf16 weights) built once on the device; for each
K the adapters are composed (``compose_cat``, global granularity, ``free``), both scorers run on the
same population and examples, and their losses are compared before anything is timed.

    PYTHONPATH=src python bench/search_throughput.py --ks 2 4 --population 16 --seqs 32 128
    PYTHONPATH=src python bench/search_throughput.py --tiny --out /tmp/search_tiny.json   # CPU smoke check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import peft
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from cat_step import SHAPE_KEYS, TARGETS, build_base, device_of, random_adapters, reset_memory, write_json

from lorasoup.cat.inject import compose_cat, remove_cat
from lorasoup.search.scoring import TargetBatch, score_one_at_a_time, score_population

CHECK_ATOL = 5e-2  # bf16 model: batched and single GEMMs round differently (losses are ~10 nats)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="numbers of adapters K")
    p.add_argument("--population", type=int, default=16, help="candidates per population P")
    p.add_argument("--rank", type=int, help="rank per adapter (default 16; 4 with --tiny)")
    p.add_argument("--examples", type=int, help="target examples k (default 5, LoraHub's few-shot; 4 tiny)")
    p.add_argument("--seqs", type=int, nargs="+", help="tokens per example (default 32 128; 24 with --tiny)")
    p.add_argument("--repeats", type=int, help="timed populations per scorer (default 5; 2 with --tiny)")
    p.add_argument("--candidates-per-forward", type=int, help="split the batched forward (memory cap)")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU; a smoke check, not a benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/search_throughput.json", help="also copied to $OUT if set")
    args = p.parse_args(argv)
    for name, full, tiny in (
        ("rank", 16, 4),
        ("examples", 5, 4),
        ("seqs", [32, 128], [24]),
        ("repeats", 5, 2),
    ):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def target_batch(args, seq: int, vocab: int, device: torch.device) -> TargetBatch:
    """Random examples; the first half of each is the prompt (labels -100), the rest the response."""
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, vocab, (args.examples, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return TargetBatch(ids.to(device), torch.ones_like(ids).to(device), labels.to(device))


def timed(score, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    score()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(composition, batch: TargetBatch, weights: torch.Tensor, args, device: torch.device) -> dict:
    """Both scorers on one population: their losses compared, then each timed ``args.repeats`` times."""
    chunk = args.candidates_per_forward
    scorers = {
        "batched": lambda: score_population(composition, [batch], weights, candidates_per_forward=chunk),
        "one_at_a_time": lambda: score_one_at_a_time(composition, [batch], weights),
    }
    row: dict = {"population": len(weights), "examples": batch.size, "seq": batch.input_ids.shape[1]}
    losses = {name: score() for name, score in scorers.items()}  # also the warm-up
    diff = float((losses["batched"] - losses["one_at_a_time"]).abs().max())
    row["check"] = {"max_abs_loss_diff": diff, "atol": CHECK_ATOL, "ok": diff <= CHECK_ATOL}
    for name, score in scorers.items():
        reset_memory(device)
        seconds = [timed(score, device) for _ in range(args.repeats)]
        row[name] = {
            "seconds": seconds,
            "candidates_per_s": len(weights) / statistics.median(seconds),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
    row["speedup"] = row["batched"]["candidates_per_s"] / row["one_at_a_time"]["candidates_per_s"]
    return row


def run_k(k: int, model, args, device: torch.device) -> list[dict]:
    adapters = random_adapters(model, k, args.rank, args.seed)
    composition = compose_cat(model, adapters, granularity="global", parameterisation="free")
    g = torch.Generator().manual_seed(args.seed + 2)
    weights = torch.empty(args.population, 1, k).uniform_(-1.5, 1.5, generator=g)  # (P, G=1, K)
    rows = []
    try:
        for seq in args.seqs:
            batch = target_batch(args, seq, model.config.vocab_size, device)
            try:
                rows.append({"k": k} | measure(composition, batch, weights, args, device))
            except Exception as err:  # OOM at one size: record it and go on
                traceback.print_exc()
                rows.append({"k": k, "seq": seq, "error": repr(err)})
            reset_memory(device)
    finally:
        remove_cat(composition)
        reset_memory(device)
    return rows


def header(args, model, device: torch.device) -> dict:
    on_gpu = device.type == "cuda"
    versions = {m.__name__: m.__version__ for m in (torch, transformers, peft)}
    return {
        "benchmark": "search_throughput",
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "versions": versions | {"cuda": torch.version.cuda, "python": sys.version.split()[0]},
        "model": {key: getattr(model.config, key) for key in SHAPE_KEYS} | {"dtype": "bf16", "attn": "sdpa"},
        "targets": list(TARGETS),
        "args": vars(args),
        "timing": "wall clock around a synchronised population, median of repeats",
        "scorers": {
            "batched": "lorasoup.search.scoring.score_population: P candidates x k examples in one forward",
            "one_at_a_time": "score_one_at_a_time: one forward of k examples per candidate (LoraHub's way)",
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = device_of(args)
    model = build_base(args, device).eval()
    result = header(args, model, device) | {"rows": []}
    for k in args.ks:
        result["rows"] += run_k(k, model, args, device)
        write_json(result, args.out, quiet=True)
    columns = (("K", 3), ("P", 4), ("k x T", 9), ("batched cand/s", 15), ("one-by-one", 11), ("speedup", 8))
    print(" ".join(f"{name:>{width}}" for name, width in (*columns, ("check", 7))))
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['k']:>3}  seq {r['seq']}: ERROR {r['error']}")
            continue
        ok = "ok" if r["check"]["ok"] else "FAILED"
        print(
            f"{r['k']:>3} {r['population']:>4} {r['examples']:>4}x{r['seq']:<4} "
            f"{r['batched']['candidates_per_s']:>15.2f} {r['one_at_a_time']['candidates_per_s']:>11.2f} "
            f"{r['speedup']:>7.2f}x {ok:>7}"
        )
    write_json(result, args.out)
    bad = [r for r in result["rows"] if "error" in r or not r["check"]["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
