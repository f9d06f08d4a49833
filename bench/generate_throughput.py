"""Generation throughput: lorasoup's batched ``generate`` vs the reference per-example loop.

One process, one random-weight model built from a config (Llama-2-7B shape in bf16 on a GPU, or a
tiny fp32 one for a CPU smoke check), so every ratio is against a baseline measured in the same
process on the same card. Every prompt is ``--prompt-len`` random token ids and every row makes
exactly ``--new-tokens`` tokens (EOS suppressed), so each variant does the same work per row. With
``--shared-prefix N`` the first N tokens of every prompt are the same (the shape of a few-shot
evaluation: GSM-Hard's 8-shot prompt is ~1,000 shared tokens before a ~60-token question).

* ``reference_loop``: what the LoRA Soups evaluation does (``cat_eval.py``): one prompt at a time,
  ``model.generate(do_sample=True, temperature=0.1, top_p=0.95)`` with the default dynamic cache.
* ``lorasoup_hf``: ``lorasoup.evaluation.generate`` (greedy unless ``--lorasoup-sampling paper``)
  for each ``--cache`` (``dynamic``; ``static``, which transformers compiles with CUDA graphs on a
  GPU) and each ``--batch``: one warm-up call with the same shapes (compilation happens there), then
  ``--repeats`` timed calls; the median is reported.
* ``lorasoup_cudagraph``: ``lorasoup.evaluation.graph_decode.GraphGenerator`` (backend
  ``cudagraph``: eager prefill, decoding step replayed as a CUDA graph) per ``--graph-attention``
  (the decoding step's attention: ``sdpa`` = the model's SDPA with PyTorch's kernel choice,
  ``sdpa-efficient`` / ``sdpa-cudnn`` / ``sdpa-math`` = SDPA limited to one kernel, ``eager`` =
  transformers' matmul-softmax-matmul) and each ``--batch``: a warm-up call (captures the graphs),
  then ``--repeats`` timed calls; per ``--graph-prefix-sharing`` (``on``: a prefix shared by every
  prompt is prefilled once and attended once per step, ``off``: every row on its own) and, with it
  on, per ``--graph-prefix-kernel`` (the step's split attention in ``torch`` operations or in the
  two ``triton`` kernels). Rows also
  give the prefill / decode split of the timed call and ``same_as_hf``: the share of rows whose
  text equals the ``lorasoup_hf`` static-cache row of the same batch (bf16 kernels differ, so a
  late divergence is not a bug; an early one would be).
  Run before the HF rows, so transformers' compiled graphs do not hold memory meanwhile.
* ``lorasoup_vllm``: the same through ``lorasoup.evaluation.vllm_backend`` when vLLM is importable
  (random weights via ``load_format="dummy"``); skipped otherwise.

tokens/s = rows × new tokens ÷ wall seconds (CUDA synchronised). ``floor_tokens_per_s`` estimates the
memory-bandwidth bound at each batch: every decoding step reads all weights plus the batch's KV cache.
``floor_with_prefill_tokens_per_s`` adds the prefill, which the wall time includes: 2 × matmul
parameters × prompt tokens FLOPs at ``--peak-tflops`` (dense BF16 spec; no kernel reaches it). Rows
that share a prefix get floors that count it once (prefilled once, read once per step).

    PYTHONPATH=src python bench/generate_throughput.py --shape 7b --batch 32 64 --cache dynamic static
    PYTHONPATH=src python bench/generate_throughput.py --shape 7b --batch 32 64 --cache static \
        --backends hf cudagraph --graph-attention sdpa eager --repeats 2
    PYTHONPATH=src python bench/generate_throughput.py --shape tiny --out /tmp/generate_tiny.json  # CPU
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))  # bench/results_io.py, when run from anywhere

from results_io import write_result

from lorasoup.evaluation.generate import PAPER_SAMPLING, GenerationSettings, generate
from lorasoup.evaluation.graph_decode import GraphGenerator

SHAPES = {
    "7b": dict(  # Llama-2-7B
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "small": dict(  # ~60M parameters: a CPU measurement that is not all overhead
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8192,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
    ),
}
GRAPH_ATTENTION = {  # --graph-attention name -> GraphGenerator arguments
    "sdpa": {"decode_attention": "sdpa"},
    "sdpa-efficient": {"decode_attention": "sdpa", "sdpa_backend": "efficient"},
    "sdpa-cudnn": {"decode_attention": "sdpa", "sdpa_backend": "cudnn"},
    "sdpa-math": {"decode_attention": "sdpa", "sdpa_backend": "math"},
    "eager": {"decode_attention": "eager"},
}
TINY_DEFAULTS = {"batch": [4], "prompt_len": 32, "new_tokens": 8, "reference_prompts": 2}
FULL_DEFAULTS = {"batch": [32, 64], "prompt_len": 1024, "new_tokens": 128, "reference_prompts": 3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--batch", type=int, nargs="+", help="lorasoup batch sizes (default 32 64; tiny: 4)")
    p.add_argument("--prompt-len", type=int, help="tokens per prompt (default 1024; tiny: 32)")
    p.add_argument("--new-tokens", type=int, help="new tokens per row (default 128; tiny: 8)")
    p.add_argument(
        "--shared-prefix", type=int, default=0, help="leading tokens every prompt shares (BOS included)"
    )
    p.add_argument(
        "--graph-prefix-sharing",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="cudagraph rows with a shared prefix prefilled once (on) and/or every row on its own (off)",
    )
    p.add_argument(
        "--graph-prefix-kernel",
        nargs="+",
        choices=["torch", "triton"],
        default=["triton"],
        help="the decoding step's shared-prefix attention (with --graph-prefix-sharing on)",
    )
    p.add_argument("--cache", nargs="+", choices=["dynamic", "static"], default=["dynamic", "static"])
    p.add_argument("--reference-prompts", type=int, help="prompts the reference loop runs (default 3)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per lorasoup variant (median)")
    p.add_argument(
        "--backends", nargs="+", choices=["hf", "cudagraph", "vllm"], default=["hf", "cudagraph", "vllm"]
    )
    p.add_argument("--graph-attention", nargs="+", choices=sorted(GRAPH_ATTENTION), default=["sdpa"])
    p.add_argument("--graph-window", type=int, default=64, help="cudagraph window_step (0: whole cache)")
    p.add_argument("--graph-check-every", type=int, default=16, help="cudagraph steps between host checks")
    p.add_argument(
        "--profile-decode",
        action="store_true",
        help="per --graph-attention, kernel times of a few eager decoding steps at the largest batch",
    )
    p.add_argument("--lorasoup-sampling", choices=["greedy", "paper"], default="greedy")
    p.add_argument(
        "--bandwidth-gbs", type=float, default=None, help="HBM GB/s for the floor (default: the card's spec)"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="dense BF16 TFLOPS (default: the card's spec)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/generate_throughput.json", help="also copied to $OUT")
    args = p.parse_args(argv)
    if args.shared_prefix < 0:
        p.error("--shared-prefix must be >= 0")
    defaults = TINY_DEFAULTS if args.shape == "tiny" else FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


class IdTokenizer:
    """Prompts written as space-separated token ids ("17 2345 ..."), so a random model needs no vocab."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [int(t) for t in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r) for r in rows]


def build_model(args, device: torch.device) -> LlamaForCausalLM:
    """Random Llama built straight on the device (bf16 on GPU, fp32 on CPU)."""
    config = LlamaConfig(**SHAPES[args.shape], attn_implementation="sdpa", bos_token_id=1, eos_token_id=2)
    config.max_position_embeddings = max(4096, args.prompt_len + args.new_tokens)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def make_prompts(args, count: int, vocab: int) -> list[str]:
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, vocab, (count, args.prompt_len - 1), generator=g)  # BOS makes prompt_len
    shared = max(0, min(args.shared_prefix, args.prompt_len - 1) - 1)  # BOS is the first shared token
    ids[:, :shared] = ids[0, :shared]
    return [" ".join(map(str, row.tolist())) for row in ids]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_loop(model, tokenizer, prompts, args, device) -> dict:
    """The reference evaluation: batch 1, HF sampling (T=0.1, top-p 0.95), dynamic cache."""

    def one(prompt: str, new_tokens: int) -> int:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                num_beams=1,
                **PAPER_SAMPLING,
            )
        tokenizer.decode(out[0, ids.shape[1] :].tolist())
        return out.shape[1] - ids.shape[1]

    one(prompts[0], 2)  # warm-up
    sync(device)
    began = time.perf_counter()
    tokens = sum(one(p, args.new_tokens) for p in prompts)
    sync(device)
    seconds = time.perf_counter() - began
    return {
        "variant": "reference_loop",
        "batch": 1,
        "cache": "dynamic",
        "sampling": "paper",
        "rows": len(prompts),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }


def lorasoup_variant(generate_fn, prompts, settings, args, device, name: str, texts=None) -> dict:
    """Warm-up call with the same shapes, then ``--repeats`` timed calls (median).

    ``texts``: a list that receives the last call's generated texts.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm_began = time.perf_counter()
    generate_fn(prompts, settings)
    sync(device)
    warm_s = time.perf_counter() - warm_began
    times, tokens = [], 0
    for _ in range(args.repeats):
        began = time.perf_counter()
        out = generate_fn(prompts, settings)
        sync(device)
        times.append(time.perf_counter() - began)
        tokens = sum(g.new_tokens for g in out)
    if texts is not None:
        texts[:] = [g.text for g in out]
    seconds = statistics.median(times)
    row = {
        "variant": name,
        "batch": settings.batch_size,
        "cache": settings.cache_implementation,
        "sampling": args.lorasoup_sampling,
        "rows": len(prompts),
        "tokens": tokens,
        "seconds": seconds,
        "seconds_all": times,
        "warmup_s": warm_s,
        "tokens_per_s": tokens / seconds,
    }
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def settings_for(args, batch: int, cache: str) -> GenerationSettings:
    sampling = PAPER_SAMPLING if args.lorasoup_sampling == "paper" else {}
    return GenerationSettings(
        max_new_tokens=args.new_tokens,
        batch_size=batch,
        cache_implementation=cache,
        ignore_eos=True,
        seed=args.seed,
        **sampling,
    )


def floor_with_prefill_tokens_per_s(model, args, batch: int, shared: int = 0) -> float:
    """The bound with the prefill counted: ``2 x matmul params x prompt tokens`` FLOPs at peak, then
    ``new_tokens`` steps at the bandwidth floor (one too many: the first token comes from the prefill).
    ``shared`` leading prompt tokens prefilled once for the batch."""
    embeddings = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    matmul_params = sum(p.numel() for p in model.parameters()) - embeddings  # lm_head: last position only
    prompt_tokens = shared + batch * (args.prompt_len - shared)
    prefill_s = 2 * matmul_params * prompt_tokens / (args.peak_tflops * 1e12)
    decode_s = args.new_tokens * batch / floor_tokens_per_s(model, args, batch, shared)
    return batch * args.new_tokens / (prefill_s + decode_s)


def floor_tokens_per_s(model, args, batch: int, shared: int = 0) -> float:
    """Bandwidth bound: per step, all weights plus the batch's KV cache at mid-generation are read
    (``shared`` leading prompt tokens' keys and values once for the batch)."""
    c = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    element = next(model.parameters()).element_size()
    head_dim = c.hidden_size // c.num_attention_heads
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * element
    kv_bytes = (shared + batch * (args.prompt_len - shared + args.new_tokens / 2)) * kv_per_token
    return batch / ((weight_bytes + kv_bytes) / (args.bandwidth_gbs * 1e9))


def vllm_rows(args, prompts_by_batch, tokenizer) -> list[dict]:
    """vLLM through lorasoup's backend, random weights (``load_format="dummy"``); a skip row without it."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return [{"variant": "lorasoup_vllm", "skipped": "vllm is not installed"}]
    from lorasoup.evaluation.vllm_backend import VllmGenerator

    folder = Path(tempfile.mkdtemp(prefix="vllm-random-"))
    config = LlamaConfig(**SHAPES[args.shape], bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    config.max_position_embeddings = max(4096, args.prompt_len + args.new_tokens)
    config.save_pretrained(folder)
    engine_args = {
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "max_model_len": args.prompt_len + args.new_tokens + 8,
    }
    rows = []
    try:
        engine = VllmGenerator(
            str(folder),
            tokenizer,
            dtype="bfloat16",
            seed=args.seed,
            engine_args=engine_args,
            sampling_args={"detokenize": False},  # no tokenizer: token ids only
        )
        for batch, prompts in prompts_by_batch.items():
            settings = settings_for(args, batch, "dynamic")
            row = lorasoup_variant(
                engine.generate, prompts, settings, args, torch.device("cuda"), "lorasoup_vllm"
            )
            rows.append(row | {"cache": "vllm-paged", "floor_tokens_per_s": None})
    except Exception as err:  # untested on this project's machines (vLLM is not installed there)
        traceback.print_exc()
        rows.append({"variant": "lorasoup_vllm", "error": repr(err)})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def table(rows: list[dict], reference: float | None) -> str:
    lines = [f"{'variant':<20}{'cache':>22}{'batch':>7}{'tokens/s':>11}{'x ref':>9}{'floor %':>9}"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"{r['variant']:<20}  {r.get('skipped') or 'ERROR ' + r.get('error', '')}")
            continue
        ratio = f"{r['tokens_per_s'] / reference:.1f}" if reference else "-"
        floor = (
            f"{100 * r['tokens_per_s'] / r['floor_tokens_per_s']:.0f}" if r.get("floor_tokens_per_s") else "-"
        )
        lines.append(
            f"{r['variant']:<20}{r['cache']:>22}{r['batch']:>7}{r['tokens_per_s']:>11.1f}{ratio:>9}{floor:>9}"
        )
    return "\n".join(lines)


def header(args, model, on_gpu: bool) -> dict:
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    return {
        "benchmark": "generate_throughput",
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "versions": versions | {"cuda": torch.version.cuda, "python": sys.version.split()[0]},
        "model": SHAPES[args.shape] | {"dtype": str(next(model.parameters()).dtype), "attn": "sdpa"},
        "args": vars(args),
        "rows": [],
    }


def hf_rows(model, tokenizer, prompts: dict, args, device: torch.device, result: dict) -> float | None:
    """The reference loop, the cudagraph backend, then lorasoup's HF generation; returns the reference."""
    plan = [("reference", 1, "dynamic")]
    if "cudagraph" in args.backends:
        plan += [
            ("cudagraph", b, (a, sharing, kernel))
            for a in args.graph_attention
            for sharing in args.graph_prefix_sharing
            for kernel in (args.graph_prefix_kernel if sharing == "on" else ["torch"])
            for b in args.batch
        ]
        plan += [("profile", max(args.batch), a) for a in args.graph_attention if args.profile_decode]
    if "hf" in args.backends:
        plan += [("hf", b, c) for c in args.cache for b in args.batch]
    reference, texts = None, {}
    for kind, batch, option in plan:
        try:
            if kind == "reference":
                chosen = prompts[args.reference_prompts][: args.reference_prompts]
                row = reference_loop(model, tokenizer, chosen, args, device)
                reference = row["tokens_per_s"]
            elif kind == "profile":
                profiles = result.setdefault("decode_profiles", {})
                profiles[option] = profile_decode(model, tokenizer, prompts[batch], args, option)
                write_result(result, args.out)
                continue
            elif kind == "cudagraph":
                out = texts.setdefault((kind, batch, option), [])
                row = graph_variant(model, tokenizer, prompts[batch], args, device, *option, out)
            else:
                fn = lambda p, s: generate(model, tokenizer, p, s)  # noqa: E731
                settings = settings_for(args, batch, option)
                out = texts.setdefault((kind, batch, option), [])
                row = lorasoup_variant(fn, prompts[batch], settings, args, device, "lorasoup_hf", out)
            shared = row.get("shared_prefix_tokens", 0)  # prefilled once and read once per step
            row["floor_tokens_per_s"] = floor_tokens_per_s(model, args, batch, shared)
            row["floor_with_prefill_tokens_per_s"] = floor_with_prefill_tokens_per_s(
                model, args, batch, shared
            )
        except Exception as err:  # OOM at a large batch, say: record it and go on
            traceback.print_exc()
            row = {"variant": kind, "batch": batch, "cache": option, "error": repr(err)}
        add_row(result, row, reference, args)
        free_memory(device)
    compare_with_hf(result["rows"], texts)
    return reference


def graph_variant(
    model, tokenizer, prompts, args, device, attention: str, sharing: str, kernel: str, texts: list
) -> dict:
    """The cudagraph backend: warm-up call (captures), timed calls; prefill/decode split of the last."""
    generator = GraphGenerator(
        model,
        tokenizer,
        window_step=args.graph_window,
        check_every=args.graph_check_every,
        min_shared_prefix=32 if sharing == "on" else 0,
        prefix_kernel=kernel,
        **GRAPH_ATTENTION[attention],
    )
    calls = []

    def run(batch_prompts, settings):
        out = generator.generate(batch_prompts, settings)
        calls.append(dict(generator.stats))
        return out

    try:
        settings = settings_for(args, len(prompts), "static")  # the cache setting is not used
        row = lorasoup_variant(run, prompts, settings, args, device, "lorasoup_cudagraph", texts)
    finally:
        generator.release()
    last = calls[-1]
    shared = last.get("shared_prefix_tokens", 0)
    return row | {
        "cache": f"graph/{attention}" + (f"/shared-prefix/{kernel}" if shared else ""),
        "attention": attention,
        "prefix_sharing": sharing,
        "prefix_kernel": kernel,
        "shared_prefix_tokens": shared,
        "window_step": args.graph_window,
        "prefill_s": last["prefill_s"],
        "decode_s": last["decode_s"],
        "decode_ms_per_step": 1000 * last["decode_s"] / max(last["steps"], 1),
        "captures": calls[0]["captures"],
        "capture_s": calls[0]["capture_s"],
    }


class _ProfiledDecoding(GraphGenerator):
    """The eager (uncaptured) step, profiled from the end of the prefill on."""

    def __init__(self, *args, profiler, **kwargs):
        super().__init__(*args, **kwargs)
        self.profiler = profiler

    def _prefill(self, *args, **kwargs):
        super()._prefill(*args, **kwargs)
        torch.cuda.synchronize()
        self.profiler.start()


def profile_decode(model, tokenizer, prompts, args, attention: str, steps: int = 8) -> dict:
    """Top CUDA kernels of ``steps`` eager decoding steps (same kernels as the graph, without its launch
    savings): which attention kernel runs, and where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return {"skipped": "needs a GPU"}
    profiler = profile(activities=[ProfilerActivity.CUDA])
    generator = _ProfiledDecoding(
        model,
        tokenizer,
        capture=False,
        check_every=steps + 1,
        profiler=profiler,
        window_step=args.graph_window,
        **GRAPH_ATTENTION[attention],
    )
    settings = settings_for(args, len(prompts), "static")
    settings.max_new_tokens = steps + 1
    try:
        generator.generate(prompts, settings)
        torch.cuda.synchronize()
        profiler.stop()
    except Exception as err:
        traceback.print_exc()
        return {"error": repr(err)}
    finally:
        generator.release()
    kernels = []
    for event in profiler.key_averages():
        if not str(getattr(event, "device_type", "")).endswith("CUDA"):
            continue  # CPU ops carry their kernels' time too: count the kernels only
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0)
        if device_us > 0:
            kernels.append(
                {"name": event.key[:120], "calls": event.count, "ms_per_step": device_us / 1e3 / steps}
            )
    kernels.sort(key=lambda k: -k["ms_per_step"])
    total = sum(k["ms_per_step"] for k in kernels)
    print(f"decode profile ({attention}, batch {len(prompts)}): {total:.2f} ms of kernels per step")
    for k in kernels[:6]:
        print(f"  {k['ms_per_step']:8.3f} ms  x{k['calls'] // steps:<4} {k['name'][:90]}")
    return {"batch": len(prompts), "steps": steps, "kernel_ms_per_step": total, "kernels": kernels[:25]}


def compare_with_hf(rows: list[dict], texts: dict) -> None:
    """``same_as_hf`` and ``common_prefix_tokens`` on each cudagraph row, against HF's row of its batch."""
    for row in rows:
        if row.get("variant") != "lorasoup_cudagraph" or "attention" not in row:
            continue
        option = (row["attention"], row["prefix_sharing"], row["prefix_kernel"])
        ours = texts.get(("cudagraph", row["batch"], option))
        theirs = texts.get(("hf", row["batch"], "static")) or texts.get(("hf", row["batch"], "dynamic"))
        if not ours or not theirs:
            continue
        row["same_as_hf"] = statistics.mean(a == b for a, b in zip(ours, theirs, strict=True))
        prefix = [common_prefix(a.split(), b.split()) for a, b in zip(ours, theirs, strict=True)]
        row["common_prefix_tokens"] = {"min": min(prefix), "mean": statistics.mean(prefix)}


def common_prefix(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def add_row(result: dict, row: dict, reference: float | None, args) -> None:
    if reference and "tokens_per_s" in row:
        row["x_reference"] = row["tokens_per_s"] / reference
    result["rows"].append(row)
    print(table([row], reference), flush=True)
    write_result(result, args.out)  # after every row: a run cut off by a time limit keeps its numbers


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


CARD_SPECS = {"H200": (4800.0, 989.0), "H100": (3350.0, 989.0)}
"""HBM GB/s and dense BF16 TFLOPS of the SXM cards the device tool lends (NVIDIA data sheets)."""


def card_specs(args: argparse.Namespace, on_gpu: bool) -> None:
    """Fill ``--bandwidth-gbs`` / ``--peak-tflops`` from the card's name where not given."""
    name = torch.cuda.get_device_name() if on_gpu else ""
    known = next((spec for key, spec in CARD_SPECS.items() if key in name), CARD_SPECS["H100"])
    if args.bandwidth_gbs is None:
        args.bandwidth_gbs = known[0]
    if args.peak_tflops is None:
        args.peak_tflops = known[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    card_specs(args, on_gpu)
    if not on_gpu and args.shape == "7b":
        sys.exit("no CUDA device: the 7b shape needs a GPU (--shape small or tiny run on a CPU)")
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:
        torch.set_num_threads(1)  # on a small shared VM, OpenMP threads made tiny steps 100x slower
    model, tokenizer = build_model(args, device), IdTokenizer()
    result = header(args, model, on_gpu)
    prompts = {
        b: make_prompts(args, b, model.config.vocab_size) for b in {*args.batch, args.reference_prompts}
    }
    reference = hf_rows(model, tokenizer, prompts, args, device, result)
    if "vllm" in args.backends:
        del model  # vLLM allocates most of the card for itself
        free_memory(device)
        if not on_gpu:
            add_row(result, {"variant": "lorasoup_vllm", "skipped": "needs a GPU"}, reference, args)
        for row in vllm_rows(args, {b: prompts[b] for b in args.batch}, tokenizer) if on_gpu else []:
            add_row(result, row, reference, args)
    print("\n" + table(result["rows"], reference))
    write_result(result, args.out)
    print(f"wrote {args.out}")
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
