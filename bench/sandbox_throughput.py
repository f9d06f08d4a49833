"""Sandbox throughput: programs/s for N trivial PAL-style programs, pool vs one worker, one process.

Each program is ``def solution(): return <i> * 3``; every result is checked (exit code 1 on a wrong
one). The pool uses ``--workers`` (default: one per core); the baseline is ``workers=1``. Both runs
happen in this process after the isolation probe and a warm-up, alternating pool / serial
``--repeats`` times; the report gives the median of each and their ratio. CPU only.

    PYTHONPATH=src python bench/sandbox_throughput.py --n 200 [--workers 16] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from lorasoup.evaluation.sandbox import SandboxLimits, isolation, run_programs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="programs per run")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="pool size (default: cores)")
    p.add_argument("--repeats", type=int, default=3, help="pool and serial runs, alternating")
    p.add_argument("--out", default="", help="write the numbers as JSON here")
    return p.parse_args(argv)


def timed_run(codes: list[str], workers: int) -> float:
    """Programs per second; raises if any result is wrong."""
    start = time.perf_counter()
    results = run_programs(codes, limits=SandboxLimits(timeout_s=30.0), workers=workers)
    elapsed = time.perf_counter() - start
    wrong = [i for i, r in enumerate(results) if (r.verdict, r.returned) != ("ok", str(i * 3))]
    if wrong:
        raise SystemExit(f"wrong results for programs {wrong[:5]}: {results[wrong[0]]}")
    return len(codes) / elapsed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    codes = [f"def solution():\n    return {i} * 3\n" for i in range(args.n)]
    iso = isolation()
    timed_run(codes[: min(args.n, 2 * args.workers)], args.workers)  # warm-up: page cache, imports
    pool, serial = [], []
    for _ in range(args.repeats):
        pool.append(timed_run(codes, args.workers))
        serial.append(timed_run(codes, 1))
    result = {
        "programs": args.n,
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "isolation": iso.mode,
        "layers": list(iso.layers),
        "pool_programs_per_s": statistics.median(pool),
        "serial_programs_per_s": statistics.median(serial),
        "ratio": statistics.median(pool) / statistics.median(serial),
        "runs": {"pool": pool, "serial": serial},
        "python": sys.version.split()[0],
        "machine": platform.platform(),
    }
    print(f"isolation: {iso.mode} ({', '.join(iso.layers)}); {os.cpu_count()} cores")
    print(f"pool ({args.workers} workers): {result['pool_programs_per_s']:.1f} programs/s")
    print(f"serial (1 worker):  {result['serial_programs_per_s']:.1f} programs/s")
    print(f"ratio: {result['ratio']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
