"""ZO step time and memory: offload (ZO2 pipeline) vs all-resident, side by side in one process, interleaved.

    python -m benchmarks.offload_bench --shape tiny --seq 64 --batch 2 --steps 3 --reps 3

Prints a table and writes JSON (--out). On CUDA it also reports peak GPU memory per mode, a pinned memcpy baseline
(H2D/D2H GB/s), the H2D rate achieved by the pipeline, and whether offload and resident give the same parameters.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from benchmarks.models import SHAPES, build

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def memcpy_baseline(nbytes: int = 1 << 30, reps: int = 5) -> dict:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    for name, (dst, src) in {"h2d": (dev, host), "d2h": (host, dev)}.items():
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        out[f"{name}_GBps"] = nbytes / statistics.median(times) / 1e9
    del host, dev
    return out


def make_engine(model, offload: bool, args):
    import ds_zo
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "steps_per_print": 10**9,
           "optimizer": {"type": "ZOSGD", "params": {"lr": 1e-6, "eps": 1e-3}},
           "zero_order": {"seed": 0, "prefetch_depth": args.prefetch}}
    if offload:
        cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu", "pin_memory": True}}
    else:
        cfg["zero_order"].pop("prefetch_depth")
    engine, *_ = ds_zo.initialize(model=model, config=cfg)
    return engine


def timed_steps(engine, batch, steps: int) -> float:
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.train_batch(batch)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--modes", default="resident,offload")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    base = build(args.shape, DTYPES[args.dtype])
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = {"shape": args.shape, "dtype": args.dtype, "seq": args.seq, "batch": args.batch,
              "params": sum(p.numel() for p in base.parameters()), "device": "cuda" if cuda else "cpu"}
    if cuda:
        result["memcpy"] = memcpy_baseline()
    modes = args.modes.split(",")
    engines = {}
    for mode in modes:
        model = base if mode == modes[-1] else copy.deepcopy(base)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()   # what the engines built earlier keep on the GPU
        engines[mode] = make_engine(model, mode == "offload", args)
        engines[mode].train_batch(batch)  # warm-up (allocations, kernels)
        if cuda:
            # this mode's own peak: the process peak minus what the other engine already held
            result[f"{mode}_peak_gpu_GB"] = (torch.cuda.max_memory_allocated() - before) / 1e9
            result[f"{mode}_process_peak_gpu_GB"] = torch.cuda.max_memory_allocated() / 1e9
    del base
    times = {m: [] for m in modes}
    for _ in range(args.reps):                     # interleaved: both modes see the same machine noise
        for m in modes:
            times[m].append(timed_steps(engines[m], batch, args.steps))
    for m in modes:
        result[f"{m}_step_s_median"] = statistics.median(times[m])
        result[f"{m}_step_s_spread"] = [min(times[m]), max(times[m])]
    if "offload" in engines:
        eng = engines["offload"]
        steps_run = 1 + args.reps * args.steps
        unit_bytes = sum(s.nbytes for s in eng.pipeline.order)
        result["offloaded_unit_bytes"] = unit_bytes
        result["h2d_bytes_per_step"] = eng.comm_stats()["h2d_bytes"] / steps_run
        result["achieved_h2d_GBps"] = unit_bytes / result["offload_step_s_median"] / 1e9   # averaged over a step
        # the rate while the uploads run (timed after the timed steps: timing events cost a little per upload)
        eng.pipeline.time_transfers = True
        for m in modes:                            # every engine takes this step: the parameters are compared below
            timed_steps(engines[m], batch, 1)
        eng.pipeline.time_transfers = False
        rate = eng.pipeline.h2d_transfer_rate()
        result["h2d_during_transfer_GBps"] = rate / 1e9 if rate else None
        if rate and "memcpy" in result:
            result["h2d_during_transfer_over_memcpy"] = rate / 1e9 / result["memcpy"]["h2d_GBps"]
    if len(modes) == 2:
        result["offload_over_resident_throughput"] = (result["resident_step_s_median"]
                                                      / result["offload_step_s_median"])
        a, b = (engines[m].module_state_dict() for m in modes)
        result["params_identical"] = all(torch.equal(a[n].cpu(), b[n].cpu()) for n in a)
    for k, v in result.items():
        print(f"{k:>36}: {v}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
