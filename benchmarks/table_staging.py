"""How long a fused launch's table takes to reach the GPU, alone and behind an offloaded unit's upload (CUDA only).

    python -m benchmarks.table_staging [--upload-mb 100] [--table-words 1538] [--reps 30] [--out FILE]

Each fused pass (ds_zo/triton_passes.py) stages a small int64 table on the compute stream just before its launch.
With offload, the pipeline is meanwhile uploading the next unit on its own stream (an OPT-1.3B layer: 100 MB, about
2 ms). If the table travels by the copy engines (TABLE_STAGING "copy", cudaMemcpyAsync), it may be served after
that upload, and the compute stream waits with it; a one-program kernel reading the pinned table over PCIe
("fetch") does not use the copy engines. This times, on the GPU's clock (CUDA events on the compute stream), the
staging of one table with each method, with the side stream idle and just after an upload was issued there;
interleaved, median and spread over the repetitions.
"""
from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

from ds_zo import triton_passes


def staged_us(staging: str, table: np.ndarray, side: torch.cuda.Stream, upload: tuple | None) -> float:
    """Microseconds the compute stream spends staging `table` (upload: (dst, src) copied on `side` first)."""
    triton_passes.TABLE_STAGING = staging
    torch.cuda.synchronize()
    if upload is not None:
        with torch.cuda.stream(side):
            upload[0].copy_(upload[1], non_blocking=True)
    before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    before.record()
    triton_passes._staged(table, torch.device("cuda"))
    after.record()
    torch.cuda.synchronize()
    return before.elapsed_time(after) * 1e3


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upload-mb", type=int, default=100, help="the side stream's upload (an OPT-1.3B layer: 100)")
    p.add_argument("--table-words", type=int, default=1538, help="int64 words per table (a perturbation's "
                   "largest: 2 + 256 x 6)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.table_staging needs CUDA: it times the GPU's copy engines")
    src = torch.empty(args.upload_mb << 20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    side = torch.cuda.Stream()
    table = np.arange(args.table_words, dtype=np.int64)
    saved = triton_passes.TABLE_STAGING
    arms = [(s, busy) for s in triton_passes.STAGINGS for busy in (False, True)]
    times = {f"{s}_{'behind_upload' if busy else 'alone'}_us": [] for s, busy in arms}
    try:
        for s, busy in arms:                                      # warm-up: compile, allocate
            staged_us(s, table, side, (dst, src) if busy else None)
        for rep in range(args.reps):
            for s, busy in arms[rep % len(arms):] + arms[:rep % len(arms)]:
                times[f"{s}_{'behind_upload' if busy else 'alone'}_us"].append(
                    staged_us(s, table, side, (dst, src) if busy else None))
    finally:
        triton_passes.TABLE_STAGING = saved
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dst.copy_(src, non_blocking=True)
    end.record()
    torch.cuda.synchronize()
    result = {"gpu": torch.cuda.get_device_name(), "upload_mb": args.upload_mb, "table_words": args.table_words,
              "reps": args.reps, "upload_alone_us": start.elapsed_time(end) * 1e3}
    for name, ts in times.items():
        result[name.replace("_us", "_median_us")] = statistics.median(ts)
        result[name.replace("_us", "_spread_us")] = [min(ts), max(ts)]
    for name, value in result.items():
        print(f"{name:>34}: {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
