"""ZO step time and memory: offload (ZO2 pipeline) vs all-resident, side by side in one process, interleaved.

    python -m benchmarks.offload_bench --shape tiny --seq 64 --batch 2,4 --steps 3 --reps 3 [--calibrate]

Prints a table and writes JSON (--out). Each batch size in --batch is timed on the same two engines. On CUDA it also
reports peak GPU memory per mode (at the first batch size), a pinned memcpy baseline (H2D/D2H GB/s), the H2D rate
during the pipeline's uploads, and whether offload and resident end with the same parameters; on any device, where
one step's host time goes per mode (torch.profiler, self CPU time per op). --calibrate calibrates
ds_zo.perfmodel on this device (benchmarks/device_calibrate.py) and compares its predictions with the timed steps.
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
from ds_zo.loss import CPU_TILE_ELEMENTS, DEVICE_TILE_ELEMENTS
from ds_zo.perturb import ACCELERATOR_SPAN_CHUNKS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def memcpy_baseline(nbytes: int = 1 << 30, reps: int = 5) -> dict:
    """Pinned copies' GB/s: each direction alone ("h2d_GBps", "d2h_GBps"), and each while the other runs
    ("h2d_duplex_GBps", "d2h_duplex_GBps"), as the offload pipeline runs them: the next unit's upload beside the last
    one's offload. The performance model takes the duplex rates (device_calibrate.predict)."""
    from benchmarks.device_calibrate import device_time
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {f"{name}_GBps": nbytes / device_time(lambda: dst.copy_(src, non_blocking=True), dev.device, reps) / 1e9
           for name, (dst, src) in {"h2d": (dev, host), "d2h": (host, dev)}.items()}
    host_out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev_out = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out.update(duplex_rates({"h2d": (dev, host), "d2h": (host_out, dev_out)}, reps))
    del host, dev, host_out, dev_out
    return out


def duplex_rates(copies: dict, reps: int, pieces: int = 16) -> dict:
    """GB/s of each copy (name: (dst, src)) while they all run at once: each on a stream of its own, in `pieces`
    parts, all started together. A copy's rate is the bytes of its parts done while every copy was still running,
    over the time they took; the copy finishing last runs its tail alone, and that tail is left out. The median over
    `reps` rounds, after one untimed round."""
    streams = {name: torch.cuda.Stream() for name in copies}
    rates = {name: [] for name in copies}
    for rep in range(reps + 1):
        start, ends = torch.cuda.Event(enable_timing=True), {}
        start.record()
        for name, (dst, src) in copies.items():
            streams[name].wait_event(start)
            ends[name] = []
            with torch.cuda.stream(streams[name]):
                for d, s in zip(dst.chunk(pieces), src.chunk(pieces)):
                    d.copy_(s, non_blocking=True)
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    ends[name].append((end, s.numel() * s.element_size()))
        torch.cuda.synchronize()
        if not rep:
            continue
        done_at = {name: [(start.elapsed_time(e) / 1000, n) for e, n in parts] for name, parts in ends.items()}
        common = min(parts[-1][0] for parts in done_at.values())    # until then every copy was running
        for name, parts in done_at.items():
            inside = [(t, n) for t, n in parts if t <= common] or parts[:1]
            rates[name].append(sum(n for _, n in inside) / inside[-1][0])
    return {f"{name}_duplex_GBps": statistics.median(r) / 1e9 for name, r in rates.items()}


MODES = ("resident", "offload", "resident_whole_copies", "offload_whole_copies", "resident_chunked_z",
         "offload_chunked_z", "resident_unfused", "offload_unfused")
# mode suffixes: engines that differ from the default in one setting
VARIANTS = ("_whole_copies", "_chunked_z", "_unfused")


def mode_names(modes: list[str], depths: list[int]) -> dict[str, int | None]:
    """Each timed mode and its prefetch depth (None: all-resident). The first depth is "offload"; every further depth
    is one more offload engine, "offload_p<depth>", timed interleaved with the others. "resident_whole_copies" /
    "offload_whole_copies": an all-resident / offload (first depth) engine with zero_order.row_blocks "off" (the
    embedding and output layer from whole working copies, not the default's row blocks); "..._chunked_z": with
    zero_order.z_sampler "chunked" (torch's sampler, one seeded call per 2^20-element chunk: the z sampler GPUs
    used until the sixteenth session); "..._unfused": θ ± εz and the update as torch ops over drawn z instead of
    the fused Triton kernels (ds_zo/triton_passes.py; zero_order.fused_passes false: the sixteenth session's
    GPU path), the same values bit for bit."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; allowed: {list(MODES)}")
    out = {}
    for m in modes:
        if m == "offload":
            out.update({("offload" if i == 0 else f"offload_p{d}"): d for i, d in enumerate(depths)})
        else:
            out[m] = depths[0] if m.startswith("offload") else None
    return out


def make_engine(model, prefetch: int | None, args, whole_copies: bool = False, chunked_z: bool = False,
                unfused: bool = False):
    import ds_zo
    offload = prefetch is not None
    # one micro-batch of up to the largest batch size: each timed batch is a single forward pass per mode
    cfg = {"train_micro_batch_size_per_gpu": args.micro, "steps_per_print": 10**9,
           "optimizer": {"type": "ZOSGD", "params": {"lr": 1e-6, "eps": 1e-3}},
           "zero_order": {"seed": 0, "prefetch_depth": prefetch or 1}}
    if offload:
        cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu", "pin_memory": True}}
    else:
        cfg["zero_order"].pop("prefetch_depth")
    if whole_copies:
        cfg["zero_order"]["row_blocks"] = "off"
    if chunked_z:
        cfg["zero_order"]["z_sampler"] = "chunked"
    if unfused:
        cfg["zero_order"]["fused_passes"] = False
    engine, *_ = ds_zo.initialize(model=model, config=cfg)
    return engine


def write_json(path: str, result: dict) -> None:
    """Written whole or not at all (a timeout may kill the benchmark mid-write)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


def set_span(engines: dict, span_chunks: int) -> None:
    for engine in engines.values():
        engine.perturbations.accelerator_span_chunks = span_chunks


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
    p.add_argument("--batch", default="2", help="rows per step; a comma-separated list times each (the engines are "
                                                "built and their memory measured at the first)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prefetch", default="1", help="the offload pipeline's prefetch depth; a comma-separated list "
                                                   "builds one offload engine per depth (offload, offload_p<d>)")
    p.add_argument("--modes", default="resident,offload", help=f"a comma-separated subset of {list(MODES)}")
    p.add_argument("--span-chunks", dest="span_chunks", default=str(ACCELERATOR_SPAN_CHUNKS),
                   help="z chunks per element-wise pass on an accelerator; a comma-separated list times each, "
                        "interleaved (no effect on CPU)")
    p.add_argument("--calibrate", action="store_true",
                   help="also calibrate ds_zo.perfmodel on this device and compare its predictions with the steps")
    p.add_argument("--host-shapes", dest="host_shapes", default="tiny,wide",
                   help="--calibrate: the shapes whose ZO steps at 1 x 8 tokens fit the model's host costs (the "
                        "unit-cost shape, the chunk-cost shape)")
    p.add_argument("--unfused", action="store_true",
                   help="every engine with zero_order.fused_passes false (the GPU check's fallback where the fused "
                        "kernels fail on the device; without --calibrate, whose micro-measurements run them)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the profiled steps (GPU busy fraction, host ops, traces)")
    p.add_argument("--trace", default=None, help="also write each mode's chrome trace of one step (gzipped) here")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    spans = [int(c) for c in args.span_chunks.split(",")]
    default_span = ACCELERATOR_SPAN_CHUNKS if ACCELERATOR_SPAN_CHUNKS in spans else spans[0]
    args.micro = max(batches)
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    base = build(args.shape, DTYPES[args.dtype])
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (max(batches), args.seq), generator=g)
    batch_of = {b: {"input_ids": ids[:b], "attention_mask": torch.ones_like(ids[:b])} for b in batches}
    result = {"shape": args.shape, "dtype": args.dtype, "seq": args.seq, "batch": batches[0], "batches": batches,
              "prefetch": int(args.prefetch.split(",")[0]),
              "params": sum(p.numel() for p in base.parameters()), "device": "cuda" if cuda else "cpu",
              "build_s": time.perf_counter() - t0,
              # the token loss's tiling this code ran with (the model counts its host ops)
              "loss_tile_elements": DEVICE_TILE_ELEMENTS if cuda else CPU_TILE_ELEMENTS}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name()
        result["memcpy"] = memcpy_baseline()
    depth_of = mode_names(args.modes.split(","), [int(d) for d in args.prefetch.split(",")])
    modes = list(depth_of)
    engines = {}
    for mode in modes:
        model = base if mode == modes[-1] else copy.deepcopy(base)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()   # what the engines built earlier keep on the GPU
        engines[mode] = make_engine(model, depth_of[mode], args, whole_copies=mode.endswith("_whole_copies"),
                                    chunked_z=mode.endswith("_chunked_z"),
                                    unfused=mode.endswith("_unfused") or args.unfused)
        # warm-up (allocations, kernels): two steps, since a step's update is applied in the next one; the peak of a
        # first step alone misses the update's scratch (until the twelfth session it was measured so)
        for _ in range(2):
            engines[mode].train_batch(batch_of[batches[0]])
        if cuda:
            # this mode's own peak: the process peak minus what the other engine already held
            result[f"{mode}_peak_gpu_GB"] = (torch.cuda.max_memory_allocated() - before) / 1e9
            result[f"{mode}_process_peak_gpu_GB"] = torch.cuda.max_memory_allocated() / 1e9
    del base
    # --calibrate: the host's issue rates and the calibration steps, sampled before every repetition (the host's
    # speed drifts)
    host_samples, host_steps = [], None
    if args.calibrate:
        from benchmarks import device_calibrate as dc
        host_steps = dc.HostSteps(engines[modes[0]].device, args.host_shapes.split(","),
                                  prefetch=result["prefetch"], dtype=DTYPES[args.dtype])
    runs = []
    for b in batches:
        for span in spans:
            run = {"batch": b, "span_chunks": span}
            set_span(engines, span)
            if (b, span) != (batches[0], default_span):
                for m in modes:
                    engines[m].train_batch(batch_of[b])   # warm-up at this size (scratch sized by the span)
            times = {m: [] for m in modes}
            for rep in range(args.reps):                   # interleaved: every mode sees the same machine noise
                if host_steps is not None:
                    host_samples.append(dc.host_rates(host_steps.device))
                    host_steps.sample()
                # each repetition starts one mode later: on an H200 two identical engines timed third and first
                # differed by 10-16 % (gpu_h200_2026-11-27d), so a fixed order would favour the first modes
                for m in modes[rep % len(modes):] + modes[:rep % len(modes)]:
                    times[m].append(timed_steps(engines[m], batch_of[b], args.steps))
            for m in modes:
                run[f"{m}_step_s_median"] = statistics.median(times[m])
                run[f"{m}_step_s_spread"] = [min(times[m]), max(times[m])]
                run[f"{m}_step_s_reps"] = times[m]          # in timing order: a drifting host shows here
            if "resident" in modes:
                for m in (m for m in modes if m != "resident"):
                    run[f"{m}_over_resident_throughput"] = run["resident_step_s_median"] / run[f"{m}_step_s_median"]
            run.update(pipeline_diagnosis(engines, batch_of[b]))
            if cuda and args.profile:
                # the step's kernel time at this batch (beside the model's "compute" busy time): separates a device
                # misprediction from a host one
                for m in modes:
                    run[f"{m}_gpu_busy"] = gpu_busy(engines[m], batch_of[b])
            runs.append(run)
            if args.out:
                # what is measured so far, in case the GPU check's time runs out before the end (written again,
                # whole, at the end)
                first_run = {k: v for k, v in runs[0].items() if k not in ("batch", "span_chunks")}
                write_json(args.out, {**result, **first_run, "runs": runs, "partial": True})
    set_span(engines, default_span)
    # the first batch at the default span: its figures at top level
    first = next(r for r in runs if r["batch"] == batches[0] and r["span_chunks"] == default_span)
    result.update({k: v for k, v in first.items() if k not in ("batch", "span_chunks")})
    result["runs"] = runs
    if "offload" in engines:
        eng = engines["offload"]
        unit_bytes = sum(s.nbytes for s in eng.pipeline.order)
        result["offloaded_unit_bytes"] = unit_bytes
        result["h2d_bytes_per_step"] = eng.comm_stats()["h2d_bytes"] / eng.global_steps
        result["achieved_h2d_GBps"] = unit_bytes / result["offload_step_s_median"] / 1e9   # averaged over a step
        rate = first.get("offload_h2d_during_transfer_GBps")
        if rate and "memcpy" in result:
            result["h2d_during_transfer_over_memcpy"] = rate / result["memcpy"]["h2d_GBps"]
    # the same parameters after the same steps: offload and resident exactly; whole copies against the default path
    # (row blocks) to its rounding (on a GPU cuBLAS rounds a block's logits unlike the whole matmul's; on CPU exactly)
    # (the unfused passes compute the fused kernels' values: they belong with the plain modes)
    plain = [m for m in modes if not m.endswith(VARIANTS) or m.endswith("_unfused")]
    blocks = [m for m in modes if m.endswith("_whole_copies")]
    chunked = [m for m in modes if m.endswith("_chunked_z")]    # another z stream: alike among themselves only
    if len(plain) >= 2 or len(chunked) >= 2 or (plain and blocks):
        # one parameter at a time on the host: a 6.7B model's parameters are not all copied off the GPU at once
        states = {m: engines[m].module_state_dict() for m in modes}
        same, same_blocks, same_chunked, diff = True, True, True, 0.0
        for n, t in states[modes[0]].items():
            ref = states[plain[0]][n].cpu() if plain else None
            same &= all(torch.equal(ref, states[m][n].cpu()) for m in plain[1:])
            if len(chunked) >= 2:
                same_chunked &= all(torch.equal(states[chunked[0]][n].cpu(), states[m][n].cpu()) for m in chunked[1:])
            for m in blocks if plain else ():
                other = states[m][n].cpu()
                same_blocks &= torch.equal(ref, other)
                if ref.numel():
                    diff = max(diff, float((ref.float() - other.float()).abs().max()))
        if len(plain) >= 2:
            result["params_identical"] = same
        if len(chunked) >= 2:
            result["chunked_z_params_identical"] = same_chunked
        if blocks and plain:
            result["whole_copies_params_identical"] = same_blocks
            result["whole_copies_max_param_diff"] = diff
    for m in modes if args.profile else ():
        if cuda:
            result[f"{m}_gpu_busy"] = gpu_busy(engines[m], batch_of[batches[0]])
        trace = os.path.join(args.trace, f"{args.shape}_b{batches[0]}_{m}.json") if args.trace else None
        result[f"{m}_host_ops"] = host_ops(engines[m], batch_of[batches[0]], trace=trace)
    if args.calibrate and "resident" in engines:
        result["model"] = calibrate_and_predict(engines["resident"], args, batches, result, host_samples, host_steps)
    for k, v in result.items():
        if k not in ("runs", "model") and not k.endswith("_host_ops"):
            print(f"{k:>36}: {v}")
    for m in modes if args.profile else ():
        ops = result[f"{m}_host_ops"]
        if "top" in ops:
            print(f"{m} host: {ops['ops']} ops, {ops['op_cpu_s']:.4f} s of op CPU time in a {ops['wall_s']:.4f} s step;"
                  " top: " + ", ".join(f"{o['op']} {o['count']}x {o['self_cpu_s'] * 1e3:.1f} ms" for o in ops["top"][:8]))
    for run in runs:
        print("  batch", run["batch"], "span", run["span_chunks"],
              {k: v for k, v in run.items() if k not in ("batch", "span_chunks")})
    for case in result.get("model", {}).get("cases", []):
        print("  model:", case)
    if args.out:
        write_json(args.out, result)
    return result


def pipeline_diagnosis(engines: dict, batch) -> dict:
    """One more step of every engine (so that all end with the same parameters); in the offload engines' step, per
    mode: the H2D rate while the uploads run and the seconds the compute stream waited for uploads (CUDA timing
    events around the copies and the waits; they cost a little, hence a step of its own), and the host seconds spent
    in the pipeline's begin/enter/exit. Compute waiting on uploads points at the schedule; host time at bookkeeping."""
    out = {}
    for m, engine in engines.items():
        pipe = getattr(engine, "pipeline", None)
        if pipe is None:
            timed_steps(engine, batch, 1)
            continue
        spent = [0.0]

        def timed(fn):
            def call(*a, **kw):
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    spent[0] += time.perf_counter() - t
            return call
        names = ("begin", "enter", "exit")
        for name in names:                      # on this instance only, removed below
            setattr(pipe, name, timed(getattr(pipe, name)))
        pipe.time_transfers = True
        try:
            out[f"{m}_diagnosed_step_s"] = timed_steps(engine, batch, 1)
        finally:
            pipe.time_transfers = False
            for name in names:
                delattr(pipe, name)
        rate, stall = pipe.h2d_transfer_rate(), pipe.upload_stall_s()
        out[f"{m}_h2d_during_transfer_GBps"] = rate / 1e9 if rate else None
        out[f"{m}_upload_stall_s"] = stall
        out[f"{m}_pipeline_host_s"] = spent[0]
    return out


def gpu_busy(engine, batch) -> dict | None:
    """One step under torch.profiler: GPU kernel and copy time against the step's wall time (the profiler adds a
    little host time, so the fraction is a lower bound). A GPU that is mostly idle means the host is the bound."""
    try:
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            engine.train_batch(batch)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        kernels = memcpy = 0.0
        for avg in prof.key_averages():            # each kernel / copy is its own key's self device time (µs)
            us = avg.self_device_time_total
            if "memcpy" in avg.key.lower() or "memset" in avg.key.lower():
                memcpy += us
            else:
                kernels += us
        return {"wall_s": wall, "kernel_s": kernels / 1e6, "copy_s": memcpy / 1e6,
                "kernel_fraction": kernels / 1e6 / wall}
    except Exception as e:                       # a diagnostic: never lose the benchmark over it
        return {"error": repr(e)}


def host_ops(engine, batch, top: int = 15, trace: str | None = None) -> dict:
    """Where one step's host time goes: torch.profiler's self CPU time per op (aten ops, and on a GPU the CUDA
    runtime calls: launches, event records, stream waits), the `top` largest, beside the step's wall time, and every
    op's count. Offload and resident side by side show what the pipeline adds to the host's path (the batch-1 offload gap
    on a GPU is host-bound). trace: also write the step's chrome trace there, gzipped (host ops, kernels and copies
    on one timeline: where the device waits)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        cuda = engine.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            t0 = time.perf_counter()
            engine.train_batch(batch)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        if trace:
            os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
            prof.export_chrome_trace(trace + ".gz")            # torch gzips a path ending in .gz
        avgs = [a for a in prof.key_averages() if a.self_cpu_time_total > 0]
        largest = sorted(avgs, key=lambda a: -a.self_cpu_time_total)[:top]
        return {"wall_s": wall, "ops": sum(a.count for a in avgs),
                "op_cpu_s": sum(a.self_cpu_time_total for a in avgs) / 1e6,
                "top": [{"op": a.key, "count": a.count, "self_cpu_s": a.self_cpu_time_total / 1e6} for a in largest],
                "counts": {a.key: a.count for a in avgs}}
    except Exception as e:                       # a diagnostic: never lose the benchmark over it
        return {"error": repr(e)}


def calibrate_and_predict(resident, args, batches: list[int], result: dict, host_samples: list[dict],
                          host_steps) -> dict:
    """ds_zo.perfmodel calibrated here (benchmarks/device_calibrate.py) against the steps timed above: device rates
    measured now, host rates as the medians of their samples between the repetitions, and the host calibration
    steps sampled with them (fitted per mode by predict)."""
    from benchmarks import device_calibrate as dc
    device = resident.device
    micro = dc.micro_rates(device)
    once = {k: micro[k] for k in host_samples[0]}
    micro = dc.with_host_rates(micro, {k: statistics.median(s[k] for s in host_samples) for k in once}, device)
    cal = {"micro": micro, "host_rates_measured_once": once, "host_rate_samples": host_samples,
           "host_steps": host_steps.record(),
           "forward": [dc.forward_rate(resident.module, args.shape, 2 * b, args.seq) for b in batches]}
    return cal | dc.predict(result | {"model": cal})


if __name__ == "__main__":
    main()
