"""Training-step cost of CAT vs stock PEFT multi-adapter LoRA vs the frozen floor (see bench/README.md).

One process, one base model (Llama-2-7B shape, random bf16 weights) built once on the device and
wrapped/unwrapped per variant, so every ratio is against a baseline measured in the same process.

Every variant runs in every mode (eager, plain ``torch.compile`` and ``reduce-overhead``, i.e. CUDA
graphs), so each ratio compares like with like: CAT / floor and CAT / PEFT are taken within one mode.
PEFT runs twice: with bf16 adapters as CAT's (``peft_multi``) and with its default fp32 adapters
(``peft_fp32``, ``autocast_adapter_dtype=True``). ``cat_stacked``: CAT with each module's base weight
and ``A`` stacked in one frozen matrix (``lorasoup.cat.stacked``, what CAT's training uses under CUDA graphs).
``--modes max-autotune`` (not a default: minutes of autotuning per variant) compiles with Inductor's
Triton GEMM templates under CUDA graphs, which can fuse the add into the base output and the
coefficient product into the adapter GEMMs: what is left of CAT over the floor under graphs
(docs/benchmarks.md) without a hand-written kernel, measured like for like with the floor's own.
``--profile`` adds, per variant, the CUDA kernels of a few compiled steps (torch.profiler), grouped
by kind, to show what CAT adds over the floor.

    PYTHONPATH=src python bench/cat_step.py --ks 2 4 --compile-scope layers --profile   # GPU, ~4 min
    PYTHONPATH=src python bench/cat_step.py --tiny --out /tmp/cat_step_tiny.json   # CPU smoke check
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))  # bench/results_io.py, when run from anywhere

from results_io import write_result

from lorasoup.adapters import LoraAdapter, LoraFactors
from lorasoup.cat import stacked as cat_stacked
from lorasoup.cat.inject import compose_cat, remove_cat

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
FULL = dict(  # Llama-2-7B
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
SHAPE_KEYS = tuple(FULL)
TINY = dict(zip(SHAPE_KEYS, (64, 172, 2, 4, 4, 256), strict=True))
CHECK_RTOL = 2e-2  # bf16: compiled kernels fuse and reorder reductions, so losses differ in the 3rd digit
VARIANTS = ("floor", "peft_multi", "peft_fp32", "peft_single", "cat", "cat_stacked")
MODES = ("eager", "compile", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_MODES = MODES[:3]
PROFILE_MODE = "compile"  # CUDA graphs hide the kernels from the profiler: profile the plain compile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="numbers of adapters K")
    p.add_argument("--rank", type=int, help="rank per adapter (default 32; 8 with --tiny)")
    p.add_argument("--steps", type=int, help="timed steps (default 20; 3 with --tiny)")
    p.add_argument("--batch", type=int, help="default 4; 2 with --tiny")
    p.add_argument("--seq", type=int, help="default 256; 32 with --tiny")
    p.add_argument("--warmup", type=int, default=3, help="eager warm-up steps")
    p.add_argument("--compile-warmup", type=int, default=5, help="compiled warm-up steps (compile is here)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    modes_help = "modes every variant runs in (default: eager compile reduce-overhead; on CPU eager)"
    p.add_argument("--modes", nargs="+", choices=MODES, help=modes_help)
    profile_help = f"record each variant's CUDA kernels over 3 steps under {PROFILE_MODE!r} (GPU only)"
    p.add_argument("--profile", action="store_true", help=profile_help)
    scope_help = "compile the whole model, or each decoder layer (far less compile time)"
    p.add_argument("--compile-scope", choices=["model", "layers"], default="model", help=scope_help)
    p.add_argument("--tiny", action="store_true", help="tiny model, 2x32 tokens, 3 steps; runs on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/cat_step.json", help="also copied to $OUT if set")
    args = p.parse_args(argv)
    for name, full, tiny in (("rank", 32, 8), ("steps", 20, 3), ("batch", 4, 2), ("seq", 256, 32)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.modes is None:  # CUDA graphs need CUDA; compiling on the CPU smoke check only costs time
        args.modes = list(DEFAULT_MODES) if torch.cuda.is_available() else ["eager"]
    return args


def device_of(args) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not args.tiny:
        sys.exit("no CUDA device: the full-size benchmark needs a GPU (use --tiny for a CPU smoke check)")
    # one thread: on a small shared VM, OpenMP threads made tiny steps jump between 5 and 900 ms
    torch.set_num_threads(1)
    return torch.device("cpu")


def timed(step, batch, device: torch.device) -> tuple[float, float, torch.Tensor]:
    """(device ms, host wall ms, loss) of one step started on an idle queue: the launch overhead of a
    launch-bound step then shows in the device time instead of hiding behind the previous step."""
    if device.type != "cuda":  # CPU smoke check: wall clock only
        t0 = time.perf_counter()
        loss = step(batch)
        wall_ms = (time.perf_counter() - t0) * 1e3
        return wall_ms, wall_ms, loss
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    loss = step(batch)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), (time.perf_counter() - t0) * 1e3, loss


def reset_memory(device: torch.device) -> float:
    """Start a variant's peak from here; returns the GiB already resident (the base model)."""
    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def build_base(args, device: torch.device) -> LlamaForCausalLM:
    """Random Llama built straight on the device in bf16: never materialised in fp32 on the host."""
    config = LlamaConfig(**(TINY if args.tiny else FULL), attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.requires_grad_(False).train()  # Llama's dropout is 0; train() for the training paths


def make_batches(args, vocab: int, device: torch.device, count: int = 4) -> list[torch.Tensor]:
    """A few distinct batches to rotate over, from a private generator."""
    g = torch.Generator().manual_seed(args.seed + 1)
    return [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(count)]


def target_paths(model) -> list[str]:
    return [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS]


def random_adapters(model, k: int, rank: int, seed: int) -> list[LoraAdapter]:
    ref = model.get_input_embeddings().weight
    g = torch.Generator(device=ref.device).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=ref.device, dtype=ref.dtype) * 0.01  # noqa: E731
    adapters = []
    for i in range(k):
        linears = {path: model.get_submodule(path) for path in target_paths(model)}
        modules = {
            p: LoraFactors(rand(rank, m.in_features), rand(m.out_features, rank), 2.0)
            for p, m in linears.items()
        }
        adapters.append(LoraAdapter(name=f"a{i}", source="random", modules=modules, base_model=None))
    return adapters


def attach(kind: str, model, k: int, args) -> tuple[object, list[torch.nn.Parameter], str]:
    """Wrap the base model for one variant: (handle for detach, trainable params, note)."""
    if kind == "floor":
        return None, [], "frozen base; grad w.r.t. inputs_embeds"
    if kind in ("cat", "cat_stacked"):
        adapters = random_adapters(model, k, args.rank, args.seed)
        comp = compose_cat(model, adapters, granularity="module", parameterisation="softmax", seed=args.seed)
        note = "lorasoup compose_cat (module, softmax); trains theta only (AdamW)"
        if kind == "cat_stacked":  # one frozen [W0; A] per module (lorasoup.cat.stacked)
            note += f"; {cat_stacked.stack(model)} modules with [W0; A] stacked (lorasoup.cat.stacked)"
        return comp, [comp.weights.theta], note
    multi = kind in ("peft_multi", "peft_fp32")
    rank = args.rank if multi else args.rank * k
    names = [f"a{i}" for i in range(k if multi else 1)]
    # init_lora_weights=False: non-zero B (zeros can hide work); alpha = 2r: scale 2 as CAT's adapters
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGETS), init_lora_weights=False
    )
    autocast = kind == "peft_fp32"  # PEFT's default (True) makes A/B fp32: GEMMs in fp32
    wrapped = get_peft_model(model, config, adapter_name=names[0], autocast_adapter_dtype=autocast)
    for name in names[1:]:
        wrapped.add_adapter(name, config, autocast_adapter_dtype=autocast)
    wrapped.base_model.set_adapter(names)  # all active at once: PEFT's per-adapter loop (LoRA Soups code)
    model.requires_grad_(False)  # set_adapter made A/B trainable; CAT trains no factor either
    dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if ".lora_" in n})
    note = f"stock PEFT, {len(names)} active, r={rank}, A/B {dtypes} frozen; grad w.r.t. inputs_embeds"
    return wrapped, [], note


def detach(kind: str, model, handle) -> None:
    """Give the plain frozen base back for the next variant."""
    if kind.startswith("cat"):
        cat_stacked.unstack(model)  # nothing to do for the plain layer
        remove_cat(handle)
    elif kind.startswith("peft"):
        handle.unload()
        if hasattr(model, "peft_config"):  # a stale config would leak adapters into the next wrap
            del model.peft_config
    leftovers = [p for p in target_paths(model) if type(model.get_submodule(p)) is not torch.nn.Linear]
    assert not leftovers, f"{kind}: modules not restored: {leftovers[:3]}"


def compiled(model, mode: str, scope: str):
    """(callable, undo). Scope 'layers' swaps each decoder layer for its compiled wrapper (regional
    compilation: one layer graph reused by all layers instead of tracing one 32-layer graph)."""
    if mode == "eager":
        return model, lambda: None
    cmode = None if mode == "compile" else mode
    if scope == "model":
        return torch.compile(model, mode=cmode), lambda: None
    layers = model.model.layers
    originals = list(layers)
    # One graph serves every layer (checked on the CPU with TORCH_LOGS=recompiles, 4 layers, every
    # variant): make_step gives every layer an input that requires grad. Should a variant's layers
    # still recompile, the raised limit keeps Dynamo from silently running the rest eagerly after its
    # default 8, and `unique_graphs` in the result shows it.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(layers))
    for i, layer in enumerate(originals):
        layers[i] = torch.compile(layer, mode=cmode)

    def undo():
        for i, layer in enumerate(originals):
            layers[i] = layer

    return model, undo


def make_step(fn, model, params: list[torch.nn.Parameter], device: torch.device):
    """fwd + bwd (+ AdamW where something trains). Every variant takes the gradient w.r.t. the
    embeddings' output, as the library's CUDA-graph training does (``training.loop.inputs_require_grad``):
    the backward runs through every layer even where nothing trains, and every layer's input requires
    grad, so one compiled graph serves all layers (a first layer without it is a second graph)."""
    embed = model.get_input_embeddings()
    # fused AdamW on CUDA: one launch for the optimizer, so it adds nothing but the maths
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda") if params else None

    def step(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            emb = embed(ids)
        emb.requires_grad_(True)
        loss = fn(inputs_embeds=emb, labels=ids, use_cache=False).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure(step, batches, n_warm: int, steps: int, device: torch.device) -> dict:
    warm = [timed(step, batches[i % len(batches)], device) for i in range(n_warm)]
    runs = [timed(step, batches[i % len(batches)], device) for i in range(steps)]
    dev, wall, losses = [r[0] for r in runs], [r[1] for r in runs], [float(r[2]) for r in runs]
    med = statistics.median(dev)
    warm_s = [w[1] / 1e3 for w in warm]
    return {
        "ms_median": med,
        "ms_min": min(dev),
        "ms_max": max(dev),
        "ms_all": dev,
        "wall_ms_median": statistics.median(wall),
        "warmup_s": warm_s,
        # compile (and any recompile) happens in warm-up: what warm-up took over steady steps
        "compile_s": max(0.0, sum(warm_s) - n_warm * med / 1e3),
        "first_loss": float(warm[0][2]),
        "losses_finite": all(map(math.isfinite, losses)),
    }


def dynamo_stats() -> dict:
    """Graph breaks (first line of the reason -> count) and graphs compiled since counters.clear()."""
    breaks = {str(reason).splitlines()[0][:160]: int(n) for reason, n in counters["graph_break"].items()}
    return {"graph_breaks": breaks, "unique_graphs": int(counters["stats"]["unique_graphs"])}


KERNEL_GROUPS = (  # substring of a kernel's name -> group; first match wins
    ("adam", "optimizer"),
    ("flash", "attention"),
    ("fmha", "attention"),
    ("attention", "attention"),
    ("gemm", "GEMM"),
    ("gemv", "GEMM"),
    ("nvjet", "GEMM"),
    ("cutlass", "GEMM"),
    ("xmma", "GEMM"),
    ("triton", "fused (Triton)"),
    ("memcpy", "copy"),
    ("memset", "copy"),
    ("elementwise", "eager element-wise"),
    ("reduce", "eager reduction"),
)


def kernel_group(name: str) -> str:
    lowered = name.lower()
    return next((group for key, group in KERNEL_GROUPS if key in lowered), "other")


def profile_kernels(step, batches, device: torch.device, steps: int = 3, top: int = 15) -> dict:
    """The CUDA kernels of ``steps`` steps, per step: time by group and the ``top`` kernels by time.
    Read beside the floor's profile, it says what a variant adds (GEMMs, fused element-wise, θ's
    gradient reductions, AdamW)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(batches[i % len(batches)])
        torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us > 0:
            kernels.append((event.key, event.count / steps, us / 1e3 / steps))
    groups: dict[str, dict[str, float]] = {}
    for name, calls, ms in kernels:
        group = groups.setdefault(kernel_group(name), {"ms": 0.0, "launches": 0.0})
        group["ms"] += ms
        group["launches"] += calls
    kernels.sort(key=lambda kernel: -kernel[2])
    return {
        "mode": PROFILE_MODE,
        "kernel_ms_per_step": sum(ms for _, _, ms in kernels),
        "launches_per_step": sum(calls for _, calls, _ in kernels),
        "groups": dict(sorted(groups.items(), key=lambda item: -item[1]["ms"])),
        "top": [{"kernel": name[:160], "calls": calls, "ms": ms} for name, calls, ms in kernels[:top]],
    }


def run_mode(name, kind, k, mode, model, handle, params, note, batches, ref_loss, args, device) -> dict:
    row = {"variant": name, "kind": kind, "k": k, "mode": mode, "note": note}
    torch._dynamo.reset()  # each compiled variant compiles from scratch, with no stale guards
    counters.clear()
    row["resident_gib"] = reset_memory(device)
    if params:  # every mode starts from the same theta, so its first loss can be checked
        params[0].data.copy_(handle.theta_init.to(params[0]))
    fn, undo = compiled(model, mode, args.compile_scope)
    t0 = time.perf_counter()
    try:
        step = make_step(fn, model, params, device)
        n_warm = args.warmup if mode == "eager" else args.compile_warmup
        row.update(measure(step, batches, n_warm, args.steps, device))
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        row["extra_gib"] = row["peak_gib"] - row["resident_gib"]
        row.update(dynamo_stats() if mode != "eager" else {"compile_s": None})
        if ref_loss is not None:
            rel = abs(row["first_loss"] - ref_loss) / abs(ref_loss)
            row["check"] = {"eager_loss": ref_loss, "rel_diff": rel, "ok": rel < CHECK_RTOL}
        if args.profile and mode == PROFILE_MODE and device.type == "cuda":
            row["profile"] = profile_kernels(step, batches, device)
    except Exception as err:  # keep the other variants of a costly GPU run
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
        traceback.print_exc()
    finally:
        undo()
    row["total_s"] = time.perf_counter() - t0
    check = row.get("check")
    check = f"vs eager {check['rel_diff']:.1e} {'ok' if check['ok'] else 'FAIL'}" if check else ""
    print(
        f"  {name:>16} {mode:<27} {row.get('ms_median', math.nan):9.2f} ms  {row.get('peak_gib', 0):6.2f} GiB"
        f"  compile {row.get('compile_s') or 0:6.1f} s  breaks {sum(row.get('graph_breaks', {}).values())}"
        f"  {check}{row.get('error', '')[:100]}",
        flush=True,
    )
    return row


def run_variant(kind: str, k: int, model, batches, args, device) -> list[dict]:
    """Attach once, measure every mode (fresh optimizer and theta per mode), detach."""
    name = {"floor": "floor", "peft_single": f"peft_single_{args.rank * k}"}.get(kind, f"{kind}_{k}")
    handle, params, note = attach(kind, model, k, args)
    rows = []
    try:
        ref_loss = None
        if kind.startswith("cat"):  # eager loss of the fresh composition on batch 0: every mode's reference
            with torch.no_grad():
                ref_loss = float(model(input_ids=batches[0], labels=batches[0], use_cache=False).loss)
        for mode in args.modes:
            rows.append(
                run_mode(name, kind, k, mode, model, handle, params, note, batches, ref_loss, args, device)
            )
    finally:
        detach(kind, model, handle)
        del handle, params
        torch._dynamo.reset()
        reset_memory(device)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Like for like: each row against the floor and against PEFT's multi-adapter loop (bf16 adapters,
    same K) measured in the same mode."""
    ms = {(r["variant"], r["mode"]): r.get("ms_median") for r in rows}
    for r in rows:
        if r.get("ms_median") is None:
            continue
        floor = ms.get(("floor", r["mode"]))
        peft_ms = ms.get((f"peft_multi_{r['k']}", r["mode"]))
        r["x_floor_same_mode"] = r["ms_median"] / floor if floor and r["kind"] != "floor" else None
        r["x_peft_same_mode"] = r["ms_median"] / peft_ms if peft_ms and r["kind"] != "floor" else None


def table(rows: list[dict]) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    cols = [("ms_median", "ms/step", ".2f", 9), ("peak_gib", "peak GiB", ".2f", 9)]
    cols += [("x_floor_same_mode", "x floor", ".3f", 9), ("x_peft_same_mode", "x PEFT", ".3f", 8)]
    cols += [("compile_s", "compile s", ".1f", 10)]
    lines = [f"{'variant':<16} {'mode':<27}" + "".join(f"{h:>{w}}" for _, h, _, w in cols)]
    for r in sorted(rows, key=lambda r: (r["mode"], r.get("k", 0))):
        cells = "".join(f"{fmt(r.get(key), f):>{w}}" for key, _, f, w in cols)
        lines.append(f"{r['variant']:<16} {r['mode']:<27}{cells}" + ("  ERROR" if "error" in r else ""))
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    """Kernel time per step by group, one column per profiled variant."""
    profiled = [r for r in rows if "profile" in r]
    if not profiled:
        return ""
    groups = sorted({g for r in profiled for g in r["profile"]["groups"]})
    head = f"{'kernels (' + PROFILE_MODE + '), ms/step':<32}" + "".join(
        f"{r['variant']:>15}" for r in profiled
    )
    lines = [head]
    for group in [*groups, "total", "launches"]:
        cells = []
        for r in profiled:
            prof = r["profile"]
            if group == "total":
                cells.append(f"{prof['kernel_ms_per_step']:15.2f}")
            elif group == "launches":
                cells.append(f"{prof['launches_per_step']:15.0f}")
            else:
                cells.append(f"{prof['groups'].get(group, {}).get('ms', 0.0):15.2f}")
        lines.append(f"{group:<32}" + "".join(cells))
    return "\n".join(lines)


def write_json(result: dict, out: str, quiet: bool = False) -> None:
    """Also called after every variant, so a run cut off by a time limit still returns its numbers."""
    written = write_result(result, out)
    if not quiet:
        print("wrote " + " and ".join(map(str, written)))


def header(args, model, device: torch.device) -> dict:
    versions = {m.__name__: m.__version__ for m in (torch, transformers, peft)}
    on_gpu = device.type == "cuda"
    return {
        "benchmark": "cat_step",
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "versions": versions | {"cuda": torch.version.cuda, "python": sys.version.split()[0]},
        "model": {key: getattr(model.config, key) for key in SHAPE_KEYS} | {"dtype": "bf16", "attn": "sdpa"},
        "args": vars(args),
        "targets": list(TARGETS),
        "peft_adapter_dtype": {"peft_multi": "bfloat16", "peft_single": "bfloat16", "peft_fp32": "float32"},
        "peft_note": "PEFT variants: all LoRA A/B frozen, gradient w.r.t. inputs_embeds (as floor)",
        "timing": "CUDA events per step on an idle queue, median" if on_gpu else "CPU wall clock",
    }


def failed(row: dict) -> bool:
    return "error" in row or not row.get("check", {}).get("ok", True) or not row.get("losses_finite", True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = device_of(args)
    t0 = time.perf_counter()
    model = build_base(args, device)
    print(f"base model built in {time.perf_counter() - t0:.1f} s on {device}", flush=True)
    batches = make_batches(args, model.config.vocab_size, device)
    result = header(args, model, device) | {"rows": []}
    plan = [("floor", 0)] * ("floor" in args.variants)
    plan += [(kind, k) for k in args.ks for kind in VARIANTS[1:] if kind in args.variants]
    for kind, k in plan:
        try:
            result["rows"] += run_variant(kind, k, model, batches, args, device)
        except Exception as err:  # attach/detach or the reference forward failed (OOM, say): go on
            traceback.print_exc()
            result["rows"].append(
                {"variant": f"{kind}_{k}", "kind": kind, "k": k, "mode": "-", "error": repr(err)}
            )
        add_ratios(result["rows"])
        write_json(result, args.out, quiet=True)
    print("\n" + table(result["rows"]))
    print(
        "PEFT: all LoRA A/B frozen, grad w.r.t. inputs_embeds (as floor); peft_fp32: PEFT's default fp32 "
        "A/B. CAT: theta trains (AdamW). x floor, x PEFT: vs floor and vs peft_multi_K in the same mode."
    )
    if profiled := profile_table(result["rows"]):
        print("\n" + profiled)
    write_json(result, args.out)
    bad = [r for r in result["rows"] if failed(r)]
    for r in bad:
        print(f"FAILED: {r['variant']} {r['mode']}: {r.get('error') or r.get('check') or 'non-finite loss'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
