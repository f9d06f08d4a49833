"""Core-space merges vs ΔW-space merges vs PEFT's ``add_weighted_adapter``, in one process (issue 22).

Two random r=32 adapters on q, k, v, up, down of a Llama-2-7B-shaped model (160 modules), as
``bench/merge.py`` (whose model, adapters and timer this reuses). Every core-space method
(``core_linear``, ``core_ties``, ``core_dare``, ``core_dare_ties``, ``core_tsv``, and ``tsv``) is timed
beside the ΔW-space lorasoup method it corresponds to (``linear``, ``ties``, ``dare_linear``,
``dare_ties``) and the PEFT combination of the same name, on the same device, each with its peak
memory above what is resident (CUDA only); on CUDA each core-space method also one module at a time
(``core_per_module_s``: without the batched streaming path of ``merging.core_batched``), and with
larger buffer caps (``core_by_cap_mib``: seconds and peak GiB per cap). Each row also gives the
bytes of the largest module's factors (``ΣR·(out+in)``) and of its dense ``ΔW`` (``out·in``), fp32,
for scale: the claim to check is "≥ 10× faster than ΔW-space TIES/DARE, memory of the order of the
factors".

    PYTHONPATH=src python bench/core_merge.py --out bench/results/core_merge_h100.json   # GPU, ~3 min
    PYTHONPATH=src python bench/core_merge.py --tiny --out /tmp/core_merge_tiny.json     # CPU smoke run
    PYTHONPATH=src python bench/core_merge.py --skip-peft --device cpu                   # ours, 7B, CPU
    PYTHONPATH=src python bench/core_merge.py --profile --methods core_ties   # + where the time goes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/merge.py's helpers, when run from anywhere

import merge as merge_bench

from lorasoup.adapters import LoraAdapter
from lorasoup.merging import MERGE_METHODS, core_batched

# (core-space method, the ΔW-space lorasoup method it is compared with, the PEFT combination)
TRIPLES = [
    ("core_linear", "linear", "cat"),
    ("core_ties", "ties", "ties"),
    ("core_dare", "dare_linear", "dare_linear"),
    ("core_dare_ties", "dare_ties", "dare_ties"),
    ("core_tsv", "ties", "ties"),
    ("tsv", "ties", "ties"),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--methods", nargs="+", default=[c for c, _, _ in TRIPLES], choices=[c for c, _, _ in TRIPLES]
    )
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--skip-peft", action="store_true", help="time lorasoup only (no base model needed)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method (the minimum is kept)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model: a CPU smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--caps-mib",
        type=int,
        nargs="*",
        default=[256, 1024],
        help="also time each batched core method with these buffer caps (MiB; the runner's is "
        "merging.core_batched.MAX_BYTES, 64): bigger groups, fewer syncs, more memory (CUDA only)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also record each core-space method's top operators over one batched run (torch.profiler: "
        "host time with the waits for the device, and device time), to show where the time goes",
    )
    p.add_argument(
        "--host-copy",
        choices=["pinned", "prefaulted"],
        default="pinned",
        help="how the batched core-space merges land their factors on the host: 'pinned' (the library's: "
        "one pinned buffer per flush, page-locked by the allocator) or 'prefaulted' (an experiment: "
        "pageable memory first touched by torch's threads, then blocking copies; see prefaulted)",
    )
    p.add_argument("--out", default="bench/results/core_merge.json", help="also copied to $OUT if set")
    return p.parse_args()


def module_bytes(adapters: list[LoraAdapter]) -> dict[str, int]:
    """fp32 bytes of the largest module's stacked factors and of its dense ``ΔW``."""
    path = max(adapters[0].modules, key=lambda p: adapters[0].modules[p].A.numel())
    f = adapters[0].modules[path]
    total_rank = sum(a.modules[path].rank for a in adapters)
    return {
        "module": path,
        "factor_bytes": 4 * total_rank * (f.in_features + f.out_features),
        "dense_bytes": 4 * f.in_features * f.out_features,
    }


def with_cap(method: str, adapters: list[LoraAdapter], args, device: torch.device, cap_mib: int):
    """``method`` through its batched streaming path with a buffer cap of ``cap_mib`` MiB."""
    entry = MERGE_METHODS.get(method)

    def start(target: torch.device):
        streaming = entry.streaming(target)
        streaming.max_bytes = cap_mib * 2**20
        return streaming

    return merge_bench.ours_with(dataclasses.replace(entry, streaming=start), adapters, args, device)


def per_module(method: str, adapters: list[LoraAdapter], args, device: torch.device):
    """``method`` one module at a time (its ``merge``), not through its batched streaming path: the
    baseline of the batching (``merging.core_batched``), in the same process."""
    entry = dataclasses.replace(MERGE_METHODS.get(method), streaming=None)
    return merge_bench.ours_with(entry, adapters, args, device)


def profile_ops(fn, device: torch.device, top: int = 20) -> list[dict]:
    """The operators of one run of ``fn`` by host time (their own, and with what they called),
    with their device time: a wait for the device shows as host time of ``aten::_local_scalar_dense``
    or ``aten::copy_`` (a read back), a host LAPACK call as ``aten::linalg_svd`` with no device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    merge_bench.sync(device)
    with profile(activities=activities) as prof:
        fn()
        merge_bench.sync(device)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_host_ms": round(e.self_cpu_time_total / 1e3, 2),
            "host_ms": round(e.cpu_time_total / 1e3, 2),
            "device_ms": round(getattr(e, "device_time_total", 0.0) / 1e3, 2),
        }
        for e in events
    ]


def prefaulted(dtype: torch.dtype, numel: int) -> torch.Tensor:
    """An alternative host buffer for ``core_batched._copy_to_host`` (issue 22): page-locking fresh
    host memory was most of core TIES' time on an H100 (``cudaHostAlloc``, 0.25 of 0.35 s). This one is
    pageable and first touched by ``zero_`` (torch's threads, so the page faults are spread over the
    cores); the copies into it then block (the driver stages a copy to pageable memory itself)."""
    return torch.empty(numel, dtype=dtype).zero_()


def main() -> None:
    args = parse_args()
    if args.host_copy == "prefaulted":
        core_batched.pinned = prefaulted  # this process only: the variant under test
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = merge_bench.TINY if args.tiny else merge_bench.FULL
    model = None
    if args.skip_peft:
        adapters = merge_bench.random_adapters(shape, args.rank, device, args.seed)
    else:
        model = merge_bench.build_peft(shape, shape["num_hidden_layers"], args.rank, device, args.seed)
        adapters = merge_bench.adapters_of(model)
    sizes = module_bytes(adapters)
    cache: dict[str, tuple[float, float | None]] = {}

    def time_once(key: str, fn) -> tuple[float, float | None]:
        if key not in cache:
            cache[key] = merge_bench.timed(fn, device, args.repeats)
        return cache[key]

    rows: list[dict] = []
    for core, delta, combination in TRIPLES:
        if core not in args.methods:
            continue
        row: dict = {"method": core, "delta_method": delta, "peft_combination": combination, **sizes}
        row["host_copy"] = args.host_copy  # how the batched core-space path lands its factors
        try:
            row["core_s"], row["core_peak_gib"] = time_once(
                core, merge_bench.ours(core, adapters, args, device)
            )
            row["delta_s"], row["delta_peak_gib"] = time_once(
                delta, merge_bench.ours(delta, adapters, args, device)
            )
            row["speedup_vs_delta"] = round(row["delta_s"] / row["core_s"], 2)
            if core.startswith("core_") and device.type == "cuda":  # the runner streams them in batches
                row["core_per_module_s"], row["core_per_module_peak_gib"] = time_once(
                    f"{core}:per-module", per_module(core, adapters, args, device)
                )
                row["batched_speedup"] = round(row["core_per_module_s"] / row["core_s"], 2)
                row["core_by_cap_mib"] = {
                    cap: time_once(f"{core}:cap{cap}", with_cap(core, adapters, args, device, cap))
                    for cap in args.caps_mib
                }
            if args.profile and core.startswith("core_"):
                row["profile"] = profile_ops(merge_bench.ours(core, adapters, args, device), device)
        except Exception as err:  # record and go on: one failing method must not hide the others
            row["error"] = f"{type(err).__name__}: {err}"
        if model is not None and "core_s" in row:
            row["peft_s"], row["peft_peak_gib"] = time_once(
                f"peft:{combination}", merge_bench.theirs(model, combination, args)
            )
            row["speedup_vs_peft"] = round(row["peft_s"] / row["core_s"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.peft_svd_layers = 0  # bench/merge.py's report records it; PEFT's svd is not timed here
    merge_bench.write(args, device, rows, benchmark="core_merge")


if __name__ == "__main__":
    main()
