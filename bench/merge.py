"""Merge cost: lorasoup's merges vs PEFT's ``add_weighted_adapter`` in the same process (bench/README.md).

Two random r=32 adapters on q, k, v, up, down of a Llama-2-7B-shaped model (160 modules). Every
lorasoup method is timed against the PEFT combination that computes the same thing (or the thing
the paper's baselines ran), on the same device, with peak memory above what is resident.

    PYTHONPATH=src python bench/merge.py                        # GPU: everything, PEFT included
    PYTHONPATH=src python bench/merge.py --skip-peft --device cpu --methods svd   # CPU: ours only
    PYTHONPATH=src python bench/merge.py --tiny --out /tmp/merge_tiny.json        # smoke check

PEFT's ``svd`` densifies every module and runs a full SVD (minutes for a 7B adapter pair); it is timed
on a model of ``--peft-svd-layers`` layers of the same shape and scaled to 32 layers (reported as
extrapolated).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))  # bench/results_io.py, when run from anywhere

from results_io import write_result

from lorasoup.adapters import LoraAdapter, LoraFactors
from lorasoup.merging import MERGE_METHODS, MergeParams, rowwise
from lorasoup.merging.run import merge_adapters

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
FULL = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)
TINY = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
# (lorasoup method, PEFT combination_type it is compared with)
PAIRS = [
    ("linear", "cat"),  # exact Σ w ΔW: PEFT's exact one is `cat`
    ("linear_factor", "linear"),
    ("svd", "svd"),
    ("ties", "ties"),
    ("ties_factor", "ties"),
    ("dare_linear", "dare_linear"),
    ("dare_linear_factor", "dare_linear"),
    ("dare_ties", "dare_ties"),
    ("dare_ties_factor", "dare_ties"),
    ("magnitude_prune", "magnitude_prune"),
    ("magnitude_prune_factor", "magnitude_prune"),
]
WEIGHTS = [0.6, 0.4]
DEFAULT_BLOCK = rowwise.BLOCK_ELEMENTS


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=[m for m, _ in PAIRS], choices=[m for m, _ in PAIRS])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--skip-peft", action="store_true", help="time lorasoup only (no base model needed)")
    p.add_argument("--peft-svd-layers", type=int, default=1, help="layers PEFT's svd is timed on")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method (the minimum is kept)")
    p.add_argument(
        "--block-elements",
        type=int,
        nargs="+",
        default=None,
        help="row-block sizes to time the ΔW-space methods at (default: lorasoup's own)",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="write a torch.profiler table of each lorasoup method's extra run to this file",
    )
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/merge.json", help="also copied to $OUT if set")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> float:
    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    # and the pinned host blocks the last run freed: every timed run then page-locks its host copies
    # afresh, as a merge in a new process does (a reused block would hide cudaHostAlloc's cost)
    empty_host_cache = getattr(torch.accelerator, "empty_host_cache", None) or getattr(
        torch._C, "_host_emptyCache", None
    )
    if empty_host_cache is not None:
        empty_host_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_gib(device: torch.device, resident: float) -> float | None:
    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated() - resident) / 2**30, 3)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Minimum wall seconds over ``repeats`` runs, and the peak extra GiB of the last run."""
    best = float("inf")
    peak = None
    for _ in range(repeats):
        resident = reset_peak(device)
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
        peak = peak_gib(device, resident)
    return best, peak


def build_peft(shape: dict, layers: int, rank: int, device: torch.device, seed: int):
    """A random bf16 base on the device with two random PEFT adapters (PEFT's default fp32 A/B)."""
    config = LlamaConfig(**{**shape, "num_hidden_layers": layers}, use_cache=False)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            base = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), init_lora_weights=False)
    model = get_peft_model(base, lora, adapter_name="a0")
    model.add_adapter("a1", lora)
    return model


def adapters_of(model) -> list[LoraAdapter]:
    """The PEFT model's two adapters as lorasoup factors (same tensors, no copy)."""
    adapters = []
    for name in ("a0", "a1"):
        modules = {}
        for path, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and name in module.lora_A:
                modules[path] = LoraFactors(
                    A=module.lora_A[name].weight.detach(),
                    B=module.lora_B[name].weight.detach(),
                    scale=float(module.scaling[name]),
                )
        adapters.append(LoraAdapter(name=name, source="random", modules=modules, base_model=None))
    return adapters


def random_adapters(shape: dict, rank: int, device: torch.device, seed: int) -> list[LoraAdapter]:
    """Factors only, 7B shapes, no base model (for ours-only runs, e.g. on a CPU)."""
    h, m = shape["hidden_size"], shape["intermediate_size"]
    dims = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "up_proj": (m, h), "down_proj": (h, m)}
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for i in range(2):
        modules = {}
        for layer in range(shape["num_hidden_layers"]):
            for target, (out, inn) in dims.items():
                part = "self_attn" if target in ("q_proj", "k_proj", "v_proj") else "mlp"
                A = torch.randn(rank, inn, generator=g) * 0.01
                B = torch.randn(out, rank, generator=g) * 0.01
                modules[f"model.layers.{layer}.{part}.{target}"] = LoraFactors(
                    A.to(device), B.to(device), 2.0
                )
        adapters.append(LoraAdapter(name=f"a{i}", source="random", modules=modules, base_model=None))
    return adapters


def ours(method: str, adapters: list[LoraAdapter], args, device: torch.device):
    return ours_with(MERGE_METHODS.get(method), adapters, args, device)


def ours_with(entry, adapters: list[LoraAdapter], args, device: torch.device):
    """A merge of the adapters by the registry entry ``entry`` (or a variant of one), to time."""
    params = MergeParams(density=args.density if entry.uses_density else 1.0)
    modules = sorted(adapters[0].modules)
    return lambda: merge_adapters(
        adapters, WEIGHTS, entry, params, modules=modules, seed=args.seed, device=device
    )


def theirs(model, combination: str, args):
    def run() -> None:
        kwargs = {} if combination in ("cat", "linear", "svd") else {"density": args.density}
        model.add_weighted_adapter(["a0", "a1"], WEIGHTS, "merged", combination_type=combination, **kwargs)
        model.delete_adapter("merged")

    return run


def main() -> None:
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = TINY if args.tiny else FULL
    layers = shape["num_hidden_layers"]
    rows: list[dict] = []
    model = None
    if args.skip_peft:
        adapters = random_adapters(shape, args.rank, device, args.seed)
    else:
        model = build_peft(shape, layers, args.rank, device, args.seed)
        adapters = adapters_of(model)
    peft_cache: dict[str, tuple[float, float | None, bool]] = {}
    for method, combination in PAIRS:
        if method not in args.methods:
            continue
        rowwise_method = MERGE_METHODS.get(method).space == "delta" and method not in ("linear", "svd")
        for block in (args.block_elements or [None]) if rowwise_method else [None]:
            row: dict = {"method": method, "peft_combination": combination}
            if block is not None:
                row["block_elements"] = block
                rowwise.BLOCK_ELEMENTS = block
            try:
                row["lorasoup_s"], row["lorasoup_peak_gib"] = timed(
                    ours(method, adapters, args, device), device, args.repeats
                )
                if args.profile:
                    profile(ours(method, adapters, args, device), device, args.profile, row)
            except Exception as err:  # record and go on: one failing method must not hide the others
                row["lorasoup_error"] = f"{type(err).__name__}: {err}"
            finally:
                rowwise.BLOCK_ELEMENTS = DEFAULT_BLOCK
            if model is not None:
                if combination not in peft_cache:
                    peft_cache[combination] = time_peft(combination, model, shape, args, device, layers)
                seconds, peak, extrapolated = peft_cache[combination]
                row.update(peft_s=seconds, peft_peak_gib=peak, peft_extrapolated=extrapolated)
                if "lorasoup_s" in row:
                    row["speedup_vs_peft"] = round(seconds / row["lorasoup_s"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(args, device, rows)


def profile(fn, device: torch.device, path: str, row: dict) -> None:
    """One more run under torch.profiler; its top operators appended to ``path`` (not timed)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        fn()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    title = f"== {row['method']} block_elements={row.get('block_elements')}"
    with open(path, "a") as handle:
        for key in dict.fromkeys([sort, "self_cpu_time_total"]):
            handle.write(f"{title} sorted by {key}\n")
            handle.write(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=48))
            handle.write("\n")


def time_peft(combination: str, model, shape: dict, args, device: torch.device, layers: int):
    """PEFT's time for one combination; svd on a few layers, scaled to the full depth."""
    if combination != "svd" or args.tiny:
        seconds, peak = timed(theirs(model, combination, args), device, args.repeats)
        return seconds, peak, False
    small = build_peft(shape, args.peft_svd_layers, args.rank, device, args.seed)
    seconds, peak = timed(theirs(small, "svd", args), device, 1)
    del small
    return seconds * layers / args.peft_svd_layers, peak, True


def write(args, device: torch.device, rows: list[dict], benchmark: str = "merge") -> None:
    report = {
        "benchmark": benchmark,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        # the allocator settings, when set: pinned host memory through cudaHostRegister changes the copies
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": sys.version.split()[0],
        },
        "setup": {
            "shape": "tiny" if args.tiny else "llama-2-7b",
            "adapters": 2,
            "rank": args.rank,
            "targets": list(TARGETS),
            "weights": WEIGHTS,
            "density": args.density,
            "repeats": args.repeats,
            "peft_svd_layers": args.peft_svd_layers,
        },
        "rows": rows,
    }
    print("wrote " + " and ".join(map(str, write_result(report, args.out))))


if __name__ == "__main__":
    main()
