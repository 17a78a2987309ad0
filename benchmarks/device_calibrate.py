"""Calibrate ds_zo.perfmodel for the device a benchmark runs on (a GPU; on CPU the same code runs, for tests), from
micro-measurements and small ZO steps in the benchmark's own process, then predict the ZO steps that process timed.
No ZO step of the predicted shape is used to calibrate, so the comparison is a check of the model, not a fit.

Device rates are the device's own time (CUDA events; wall time after a synchronize on CPU):
- rng_rate: ds_zo's z draws (PerturbationGenerator.fill of a span of 8 chunks: one seeded torch normal_ per 2^20
  chunk on CUDA, the native vectorised mt19937 on CPU). On CUDA the draws are queued behind a sleep kernel before
  the timing starts: issued back to back they are host-bound (a chunk's launch costs the host 8-15 µs, more than
  the kernel), and timing them that way had measured the host's issue rate as the device's (eighth session's
  records: 80 G values/s "device", while the profiled steps' kernels added up to less than half the modelled
  device time);
- elem_bw: torch.add(x, y, out=o) over 64M float32 elements (12 bytes each); merge_bw: torch.cat of two of them;
- flops: a plain forward of the benchmark's model at the rows the dual forward computes (2 x batch), over the shape's
  analytic FLOPs (attention, norms, the loss and HF's module code are folded in);
- h2d_bw / d2h_bw: the pinned memcpy baseline the benchmark measured (CUDA) or a host copy (CPU);
- kernel_floor_s (CUDA): a 4096-element add's device time, queued: the floor every ZO kernel costs the device
  (records before the sixteenth session have none: 0).
Host rates:
- host_pass_s: host time to issue one small element-wise op as ds_zo does (torch.add of slices into a slice);
- host_chunk_s and unit_host_s, by default fitted to ds_zo's own ZO steps of two small shapes at 1 x 8 tokens
  (HostSteps), per mode (resident, offload): "tiny" (4 narrow layers: a unit visit's fixed cost) and "wide" (two
  OPT-1.3B-sized layers, about 60 z chunks each: a chunk's cost), the values for which the model reproduces both
  steps.
  The micro-measured alternative (kept beside it, "micro" predictions): host_chunk_s from a loop of fills of a span
  of 8 chunks (key, seeding, launch), unit_host_s from the tiny steps alone. The loops miss what a chunk costs in a
  real step (slicing, the span's passes, the pipeline's copies competing for the host) and under-predicted the
  host-bound steps by 9-17 % (eighth session).
The host's speed drifts on the GPU machines (the same step 0.125-0.209 s within one process), so offload_bench
measures the host rates and the calibration steps again before each repetition of its timed steps and uses their
medians, and predicts each repetition from its own sample as well.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Optional

import torch

from ds_zo import perfmodel as pm
from ds_zo.perturb import ACCELERATOR_SPAN_CHUNKS, CHUNK_ELEMENTS, PerturbationGenerator, slice_key


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_time(fn, device: torch.device, reps: int) -> float:
    """Median device seconds of one call of fn (CUDA events around it; on CPU the call's wall time)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def host_issue_time(fn, device: torch.device, calls: int) -> float:
    """Host seconds per call of `calls` back-to-back calls (not waiting for the device in between)."""
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    per_call = (time.perf_counter() - t) / calls
    _sync(device)
    return per_call


def host_rates(device: torch.device) -> dict:
    """The host's issue times alone (a few milliseconds to measure): taken again between a benchmark's timed steps, on
    a host whose speed drifts, so that the calibration and the steps see the same host."""
    chunk = torch.empty(CHUNK_ELEMENTS, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    zgen = PerturbationGenerator()
    key = iter(range(10**9))
    host_fill = host_issue_time(lambda: zgen.fill(chunk, 1, 0, next(key), CHUNK_ELEMENTS), device, 200)
    # as ds_zo draws on accelerators: a span of 8 whole chunks per fill_many call (the call's overhead shared)
    span = torch.empty(8 * CHUNK_ELEMENTS, device=device)
    host_span = host_issue_time(lambda: zgen.fill(span, 1, 0, next(key), span.numel()), device, 50) / 8
    extra = {}
    if zgen.counter_based(device) and zgen.fuses(device, torch.bfloat16):
        from ds_zo import triton_passes
        # a fused update launch as a decoder layer issues it (ZOSGD._apply_fused): 16 segments from a kept layout,
        # the step's 16 keys, the table's copy; `_general`: the same laid out at the call (units that do not qualify)
        flat = torch.zeros(16 * 4096, dtype=torch.bfloat16, device=device)
        thetas = flat.split(4096)
        layout = triton_passes.UpdateLaunches([(i * 4096, 4096, 0, True) for i in range(16)], 1)
        extra["host_fused_s"] = host_issue_time(lambda: layout.run(
            [[slice_key(next(key), 0, i)] for i in range(16)], flat, [1e-3], 1e-9, 0.0), device, 100)
        extra["host_fused_general_s"] = host_issue_time(lambda: zgen.update_fused(
            [(t, i, 0, t.numel(), True) for i, t in enumerate(thetas)], next(key), [1e-3], 1e-9, 0.0), device, 100)
    if zgen.counter_based(device):       # the chunked sampler's issue of the same span, beside it
        chunked = PerturbationGenerator(sampler="chunked")
        extra["host_fill_in_span_chunked_s"] = host_issue_time(
            lambda: chunked.fill(span, 1, 0, next(key), span.numel()), device, 50) / 8
    host_normal = host_issue_time(lambda: chunk.normal_(generator=gen), device, 200)
    # one element-wise op as ds_zo issues it: into a slice of a buffer, from slices
    small = torch.empty(3 * 4096, device=device)
    host_pass = host_issue_time(lambda: torch.add(small[:4096], small[4096:8192], out=small[8192:]), device, 200)
    return {"host_fill_s": host_fill, "host_fill_in_span_s": host_span, "host_normal_s": host_normal,
            "host_pass_s": host_pass, **extra}


def with_host_rates(micro: dict, rates: dict, device: torch.device) -> dict:
    """micro with its host issue times replaced by `rates` (host_rates' keys), and host_chunk_s derived from them:
    with the counter-based sampler (micro["counter_z"]) a fill's launch, which the model charges per launch; on CUDA
    otherwise a chunk's share of a span's fill; on CPU, where the draw runs on the host, a fill minus the draw."""
    out = micro | rates
    t_normal = CHUNK_ELEMENTS / micro["rng_rate"]
    if micro.get("counter_z"):
        out["host_chunk_s"] = rates["host_fill_s"]
    elif device.type == "cuda":
        out["host_chunk_s"] = rates["host_fill_in_span_s"]
    else:
        out["host_chunk_s"] = max(0.0, rates["host_fill_s"] - t_normal)
    return out


_SLEEP_CYCLES_PER_S: dict = {}


def _sleep_cycles_per_s(device: torch.device) -> float:
    """GPU clock cycles per second as torch.cuda._sleep spins them (its argument is in cycles)."""
    if device not in _SLEEP_CYCLES_PER_S:
        cycles = 10**7
        _SLEEP_CYCLES_PER_S[device] = cycles / device_time(lambda: torch.cuda._sleep(cycles), device, 3)
    return _SLEEP_CYCLES_PER_S[device]


def queued_device_time(fn, device: torch.device, reps: int) -> float:
    """Median device seconds of fn's kernels alone. On CUDA each timed call is issued behind a sleep kernel long
    enough for the host to queue every launch of fn before the first runs (checked: the start event must still be
    pending when the host has issued the end event; otherwise the sleep is lengthened and the call timed again), so
    a host slower than the kernels does not count. Elsewhere: device_time."""
    if device.type != "cuda":
        return device_time(fn, device, reps)
    lead_s = 2 * host_issue_time(fn, device, 3) + 1e-3
    rate = _sleep_cycles_per_s(device)
    times = []
    while len(times) < reps:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(lead_s * rate))
        start.record()
        fn()
        end.record()
        queued = not start.query()
        end.synchronize()
        if queued:
            times.append(start.elapsed_time(end) / 1000)
        elif lead_s > 1.0:
            raise RuntimeError("queued_device_time: the host could not issue the timed call within 1 s of sleep")
        else:
            lead_s *= 4
    return statistics.median(times)


def micro_rates(device: torch.device, n: int = 64 << 20, reps: int = 5) -> dict:
    zgen = PerturbationGenerator()
    if device.type == "cuda":
        # ds_zo's draws as the engine issues them on an accelerator: fills of a span of 8 chunks (the chunked
        # sampler: each chunk its own seeded draw; the counter-based one: one launch), scaled by ε inside the
        # sampler, timed queued (the device's time, not the host's)
        span = torch.empty(ACCELERATOR_SPAN_CHUNKS * CHUNK_ELEMENTS, device=device)
        key = iter(range(10**9))
        spans = 8

        def chunk_time(gen: PerturbationGenerator) -> float:
            def draw():
                for _ in range(spans):
                    gen.fill(span, 1, 0, next(key), span.numel(), scale=1e-3)
            return queued_device_time(draw, device, reps) / (spans * ACCELERATOR_SPAN_CHUNKS)
        t_chunk = chunk_time(zgen)
    else:   # one chunk per call: on CPU the draw runs on the host, one thread (with_host_rates subtracts it)
        chunk = torch.empty(CHUNK_ELEMENTS, device=device)
        t_chunk = device_time(lambda: [zgen.draw_chunks([(chunk, 12345)]) for _ in range(64)], device, reps) / 64
    x, y, o = (torch.randn(n, device=device) for _ in range(3))
    t_add = device_time(lambda: torch.add(x, y, out=o), device, reps)
    t_cat = device_time(lambda: torch.cat([x, y]), device, reps)
    out = {"rng_rate": CHUNK_ELEMENTS / t_chunk, "elem_bw": 12 * n / t_add, "merge_bw": 8 * n / t_cat,
           # the native CPU sweeps (the Triton kernels on GPUs are "fused_kernels", below)
           "fused_passes": device.type == "cpu" and zgen.fuses(device, torch.float32),
           "counter_z": zgen.counter_based(device)}
    if device.type == "cuda":
        if out["counter_z"]:     # the chunked sampler beside the counter-based one: its device rate
            out["rng_rate_chunked"] = CHUNK_ELEMENTS / chunk_time(PerturbationGenerator(sampler="chunked"))
            out["fused_kernels"] = zgen.fuses(device, torch.bfloat16)
        if out.get("fused_kernels"):
            # the fused update over a span of bf16 θ, queued: the model charges its θ bytes (2 b) at elem_bw and
            # the rest to drawing z, so the rate is what is left once those bytes are taken off
            theta = torch.zeros(span.numel(), dtype=torch.bfloat16, device=device)
            t = queued_device_time(lambda: [zgen.update_fused([(theta, 7, 0, theta.numel(), False)], next(key),
                                                              [1e-3], 1e-9, 0.0) for _ in range(spans)],
                                   device, reps) / spans
            out["fused_update_s_per_value"] = t / theta.numel()
            out["fused_rng_rate"] = theta.numel() / max(t - 4 * theta.numel() / out["elem_bw"], 0.1 * t)
        # a small element-wise kernel's device time (a bias's pass), queued: the model's per-kernel floor
        a, c = torch.randn(4096, device=device), torch.empty(4096, device=device)
        out["kernel_floor_s"] = queued_device_time(lambda: [torch.add(a, a, out=c) for _ in range(64)], device,
                                                   reps) / 64
        # what the eighth session's calibration measured: bare normal_ calls issued back to back (host-bound)
        chunk = torch.empty(CHUNK_ELEMENTS, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        out["rng_rate_issue_bound"] = CHUNK_ELEMENTS * 64 / device_time(
            lambda: [chunk.normal_(generator=gen) for _ in range(64)], device, reps)
    else:
        t_copy = device_time(lambda: o.copy_(x), device, reps)
        out["copy_bw"] = 4 * n / t_copy
    del x, y, o
    return with_host_rates(out, host_rates(device), device)


def forward_rate(model: torch.nn.Module, shape: str, rows: int, seq: int, reps: int = 3) -> dict:
    """FLOP/s of a plain no-grad forward of `rows` x `seq` tokens on the model's device."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (rows, seq), generator=g).to(device)
    mask = torch.ones_like(ids)

    def fwd():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    t = device_time(fwd, device, reps)
    flops = sum(u.flops_per_token for u in pm.shape(shape, seq).units) * rows * seq
    return {"rows": rows, "forward_s": t, "forward_flops": flops, "flops": flops / t}


def hardware(micro: dict, flops: float, h2d_bw: float, d2h_bw: float, dtype_bytes: int, unit_host_s: float,
             device: torch.device | str, span_chunks: int = 1,
             loss_tile_elements: int = pm.Hardware.loss_tile_elements) -> pm.Hardware:
    """On CUDA host issue, copies and compute overlap (streams); on CPU everything runs in turn on the host."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    return pm.Hardware(f"{device.type}, calibrated", flops=flops, rng_rate=micro["rng_rate"],
                       elem_bw=micro["elem_bw"], h2d_bw=h2d_bw, d2h_bw=d2h_bw, gpus_per_node=1, overlap=cuda,
                       host_chunk_s=micro["host_chunk_s"], host_pass_s=micro.get("host_pass_s", 0.0) if cuda else 0.0,
                       span_chunks=span_chunks, unit_host_s=unit_host_s, dtype_bytes=dtype_bytes,
                       merge_bw=micro["merge_bw"], fused_passes=micro.get("fused_passes", False) and dtype_bytes == 4,
                       loss_tile_elements=loss_tile_elements, counter_z=micro.get("counter_z", False),
                       kernel_floor_s=micro.get("kernel_floor_s", 0.0) if cuda else 0.0,
                       fused=bool(micro.get("fused_kernels")) and cuda, fused_rng_rate=micro.get("fused_rng_rate"),
                       host_fused_s=micro.get("host_fused_s"))


def predict(result: dict, what_if: Optional[dict] = None) -> dict:
    """ds_zo.perfmodel's step times for the runs an offload_bench result holds, from the calibration stored in it
    (result["model"]: micro, forward, and host_steps or, in records before the ninth session, unit_overhead), against
    the measured medians. With host_steps the host costs are fitted per mode (fit_host) and the micro-measured ones
    predict beside them ("predicted_micro_s", "error_micro"). `what_if`: a change for the prediction only (e.g.
    {"fused_kernels": True} on a record whose steps ran unfused): the host costs are still fitted as the record's
    steps ran, then the prediction is made with the calibration's rates changed by it."""
    cal = result["model"]
    micro = cal["micro"]
    if "memcpy" in result:
        # the offload pipeline uploads and offloads at once: each direction's rate beside the other where measured
        # (since the nineteenth session; on the H200 each ran at 50-52 GB/s in transfer-bound steps, 55 alone)
        cp = result["memcpy"]
        h2d = cp.get("h2d_duplex_GBps", cp["h2d_GBps"]) * 1e9
        d2h = cp.get("d2h_duplex_GBps", cp["d2h_GBps"]) * 1e9
    else:
        h2d = d2h = micro["copy_bw"]
    flops = {f["rows"] // 2: f["flops"] for f in cal["forward"]}        # forward at 2 x batch rows
    nbytes = 2 if result["dtype"] == "bf16" else 4
    device = torch.device(result["device"])
    spec = pm.shape(result["shape"], result["seq"])
    prefetch = result.get("prefetch", 1)
    # --calibrate samples the host before every repetition, run after run: sample k of run i is i * reps + k
    samples = cal.get("host_rate_samples") or []
    steps = cal.get("host_steps")
    overhead = cal.get("unit_overhead") or tiny_overhead(micro, steps, device)
    fits, sample_fits = {}, []
    if steps:
        fits = {m: fit_host(micro, steps, steps["median"], m, device, h2d, d2h, prefetch) for m in steps["modes"]}
        if len(steps["samples"]) == len(samples):
            sample_fits = [{m: fit_host(with_host_rates(micro, rates, device), steps, sample, m, device, h2d, d2h,
                                        prefetch) for m in steps["modes"]}
                           for rates, sample in zip(samples, steps["samples"])]

    # the loss's tiles as the run had them (records before the tenth session's change: 2^21 logits)
    tile = result.get("loss_tile_elements", 1 << 21)

    def step_s(rates: dict, unit_host_s: float, b: int, span: int, layout) -> pm.Result:
        hw = hardware(rates | (what_if or {}), flops[b], h2d, d2h, nbytes, unit_host_s, result["device"], span, tile)
        return pm.simulate(spec, hw, layout, pm.Workload(b, result["seq"]))

    def fitted(rates: dict, fit: dict) -> tuple[dict, float]:
        return rates | {"host_chunk_s": fit["host_chunk_s"]}, fit["unit_host_s"]

    cases = []
    for i, run in enumerate(result["runs"]):
        b = run["batch"]
        span = run.get("span_chunks", 1) if result["device"] == "cuda" else 1
        for mode, layout in (("resident", pm.Layout("resident")), ("offload", pm.Layout("zo2", 1, 1, prefetch))):
            if f"{mode}_step_s_median" not in run:
                continue
            measured = run[f"{mode}_step_s_median"]
            by_micro = step_s(micro, overhead["unit_host_s"], b, span, layout)
            r = step_s(*fitted(micro, fits[mode]), b, span, layout) if mode in fits else by_micro
            case = {"batch": b, "span_chunks": run.get("span_chunks"), "mode": mode, "predicted_s": r.step_s,
                    "measured_s": measured, "error": r.step_s / measured - 1, "bottleneck": r.bottleneck,
                    "busy": r.busy}
            if mode in fits:
                case.update(host_fit=fits[mode], predicted_micro_s=by_micro.step_s,
                            error_micro=by_micro.step_s / measured - 1)
            kernels = (run.get(f"{mode}_gpu_busy") or {}).get("kernel_s")
            if kernels is not None:      # the profiled step's kernel time, beside the modelled "compute" busy time
                case["measured_kernel_s"] = kernels
            reps = run.get(f"{mode}_step_s_reps") or []
            if reps and len(samples) == len(result["runs"]) * len(reps):
                # each repetition against the prediction from the host sampled just before it (a drifting host moves
                # both): its host rates, and its calibration steps (fitted) or tiny steps (micro)
                per_rep = []
                for k, t in enumerate(reps):
                    n = i * len(reps) + k
                    rates = with_host_rates(micro, samples[n], device)
                    if sample_fits and mode in sample_fits[n]:
                        rates, unit = fitted(rates, sample_fits[n][mode])
                    else:
                        unit = unit_host_from(overhead, rates, n)
                    per_rep.append(step_s(rates, unit, b, span, layout).step_s / t - 1)
                case["error_per_rep"] = per_rep
                case["error_paired"] = statistics.median(per_rep)
            cases.append(case)

    def spread(key: str) -> Optional[dict]:
        errs = [abs(c[key]) for c in cases if key in c]
        return {"median": statistics.median(errs), "max": max(errs)} if errs else None
    out = {"cases": cases, "abs_error": spread("error")}
    for key, name in (("error_paired", "abs_error_paired"), ("error_micro", "abs_error_micro")):
        if spread(key):
            out[name] = spread(key)
    return out


def _solve(f, target: float) -> float:
    """The x >= 0 at which the non-decreasing f reaches target (0 where f(0) already does)."""
    if f(0.0) >= target:
        return 0.0
    lo, hi = 0.0, 1e-5
    while f(hi) < target:
        lo, hi = hi, hi * 4
        if hi > 10.0:
            raise ValueError(f"no host cost under 10 s reproduces a step of {target} s")
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def fit_host(rates: dict, steps: dict, times: dict, mode: str, device: torch.device | str, h2d_bw: float,
             d2h_bw: float, prefetch: int = 1) -> dict:
    """unit_host_s and host_chunk_s for `mode` with which the model reproduces the measured calibration steps
    (`times`: "shape/mode" -> seconds; steps["shapes"] = (the unit-cost shape, the chunk-cost shape)): the first
    shape's step fixes the per-unit cost, the second's the per-chunk cost, alternately until both hold (each by
    bisection: the modelled step grows with either). With the fused kernels (rates["fused_kernels"]) a unit's ZO
    launches do not grow with its size, so the chunk-cost shape cannot tell a per-launch cost from the per-unit
    one: only unit_host_s is fitted, host_chunk_s keeps its micro-measured value."""
    unit_shape, chunk_shape = steps["shapes"]
    layout = pm.Layout("resident") if mode == "resident" else pm.Layout("zo2", 1, 1, prefetch)

    def modelled(shape: str, unit: float, chunk: float) -> float:
        hw = hardware(rates | {"host_chunk_s": chunk}, steps["forward_flops"][shape], h2d_bw, d2h_bw,
                      steps.get("dtype_bytes", 4), unit, device, pm_span(device))
        return pm.simulate(pm.shape(shape, HOST_SEQ), hw, layout, pm.Workload(1, HOST_SEQ)).step_s

    unit, chunk = 0.0, rates["host_chunk_s"]
    if rates.get("fused_kernels") and torch.device(device).type == "cuda":
        return {"unit_host_s": _solve(lambda x: modelled(unit_shape, x, chunk), times[f"{unit_shape}/{mode}"]),
                "host_chunk_s": chunk}
    for _ in range(8):
        unit_before, chunk_before = unit, chunk
        unit = _solve(lambda x: modelled(unit_shape, x, chunk), times[f"{unit_shape}/{mode}"])
        chunk = _solve(lambda x: modelled(chunk_shape, unit, x), times[f"{chunk_shape}/{mode}"])
        if abs(unit - unit_before) <= 1e-3 * unit and abs(chunk - chunk_before) <= 1e-3 * chunk:
            break
    return {"unit_host_s": unit, "host_chunk_s": chunk}


def pm_span(device: torch.device | str) -> int:
    """The z chunks per element-wise pass ds_zo's calibration engines use on this device."""
    return ACCELERATOR_SPAN_CHUNKS if torch.device(device).type == "cuda" else 1


def tiny_overhead(micro: dict, steps: dict, device: torch.device) -> dict:
    """The micro-measured per-unit host cost (the eighth session's calibration) from the unit-cost shape's resident
    steps: their median, and each sample's (tiny_step_s_reps, for unit_host_from)."""
    shape = steps["shapes"][0]
    flops = steps["forward_flops"][shape]
    return {"tiny_step_s_reps": [s[f"{shape}/resident"] for s in steps["samples"]], "forward_flops": flops,
            "device": torch.device(device).type,
            "unit_host_s": per_unit_host(micro, flops, steps["median"][f"{shape}/resident"], device, shape)}


def unit_host_from(overhead: dict, rates: dict, sample: int) -> float:
    """The per-unit host overhead for one sampled repetition: from that repetition's tiny steps and host rates where
    they were kept (tiny_step_s_reps, forward_flops), else the calibration's median."""
    reps, tiny_flops = overhead.get("tiny_step_s_reps"), overhead.get("forward_flops")
    if not reps or tiny_flops is None or sample >= len(reps):
        return overhead["unit_host_s"]
    return per_unit_host(rates, tiny_flops, reps[sample], overhead.get("device", "cuda"))


def per_unit_host(rates: dict, flops: float, measured: float, device: torch.device | str, shape: str = "tiny") -> float:
    """(a step of `shape` at 1 x HOST_SEQ tokens, measured − modelled without per-unit cost) / unit visits."""
    spec = pm.shape(shape, HOST_SEQ)
    bare = hardware(rates, flops, float("inf"), float("inf"), 4, 0.0, device)
    modelled = pm.simulate(spec, bare, pm.Layout("resident"), pm.Workload(1, HOST_SEQ)).step_s
    return max(0.0, (measured - modelled) / len(spec.units))


HOST_SHAPES = ("tiny", "wide")    # the unit-cost shape, the chunk-cost shape
HOST_SEQ = 8
HOST_STEPS_PER_SAMPLE = 3


class HostSteps:
    """ZO steps of the host-calibration shapes at 1 x HOST_SEQ tokens on this device, in each mode (resident, offload
    with the benchmark's prefetch depth), where the device's work is small beside the host's: what fit_host fits the
    model's host costs to. `sample()` times each engine HOST_STEPS_PER_SAMPLE times, interleaved, and keeps the
    medians (the benchmark samples before every timed repetition). The models are built in the benchmark's dtype
    (bf16 halves the offload mode's transfers, which the steps should not be bound by)."""

    def __init__(self, device: torch.device, shapes=HOST_SHAPES, modes=("resident", "offload"), prefetch: int = 1,
                 dtype: torch.dtype = torch.float32):
        import copy

        import ds_zo
        from benchmarks.baselines import zo_config
        from benchmarks.models import build
        self.device, self.shapes, self.modes, self.dtype = device, tuple(shapes), tuple(modes), dtype
        self.engines, self.batches, self.forward_flops = {}, {}, {}
        for shape in self.shapes:
            base = build(shape, dtype)
            for mode in self.modes:
                cfg = zo_config(1)
                if mode == "offload":
                    cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu", "pin_memory": True}}
                    cfg["zero_order"]["prefetch_depth"] = prefetch
                model = base if mode == self.modes[-1] else copy.deepcopy(base)
                engine, *_ = ds_zo.initialize(model=model, config=cfg)
                # the span the model is fitted with (pm_span), not the engine's own choice for the shape (the span
                # is capped at 1/64 of a model: the wide shape alone would run at 1 chunk on a GPU)
                engine.perturbations.accelerator_span_chunks = pm_span(device)
                self.engines[f"{shape}/{mode}"] = engine
            ids = torch.randint(0, base.config.vocab_size, (1, HOST_SEQ), generator=torch.Generator().manual_seed(0))
            self.batches[shape] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        self.samples: list[dict] = []
        self.time_all(1)                              # warm-up
        for shape in self.shapes:                     # a plain forward (on the device) of the rows a ZO step runs
            resident = self.engines.get(f"{shape}/resident")
            if resident is not None:
                self.forward_flops[shape] = forward_rate(resident.module, shape, 2, HOST_SEQ)["flops"]

    def time_all(self, reps: int) -> dict[str, list[float]]:
        times = {name: [] for name in self.engines}
        for _ in range(reps):
            for name, engine in self.engines.items():
                _sync(self.device)
                t = time.perf_counter()
                engine.train_batch(self.batches[name.split("/")[0]])
                _sync(self.device)
                times[name].append(time.perf_counter() - t)
        return times

    def sample(self) -> dict[str, float]:
        medians = {k: statistics.median(v) for k, v in self.time_all(HOST_STEPS_PER_SAMPLE).items()}
        self.samples.append(medians)
        return medians

    def record(self) -> dict:
        """What predict() needs: the shapes, modes, forward rates, every sample and their medians."""
        return {"shapes": list(self.shapes), "modes": list(self.modes), "forward_flops": self.forward_flops,
                "dtype_bytes": torch.empty(0, dtype=self.dtype).element_size(),
                "steps_per_sample": HOST_STEPS_PER_SAMPLE, "samples": self.samples,
                "median": {k: statistics.median(s[k] for s in self.samples) for k in self.engines}}


def main(argv=None) -> None:
    """Re-run the model's predictions on stored offload_bench results (after a change to ds_zo.perfmodel), optionally
    with host and device rates measured again (--measure on the device, then --micro here)."""
    import argparse
    import json
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", nargs="*", help="offload_bench --calibrate JSON files (rewritten in place)")
    p.add_argument("--measure", metavar="OUT", help="measure micro rates and the host calibration steps here, write "
                                                    "them")
    p.add_argument("--micro", metavar="FILE", help="use the rates --measure wrote instead of the stored ones")
    args = p.parse_args(argv)
    if args.measure:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        micro = micro_rates(device)
        host = HostSteps(device)
        for _ in range(3):
            host.sample()
        cal = {"micro": micro, "host_steps": host.record()}
        print(cal)
        with open(args.measure, "w") as f:
            json.dump(cal, f, indent=2)
    remeasured = None
    if args.micro:
        with open(args.micro) as f:
            remeasured = json.load(f)
    for path in args.results:
        with open(path) as f:
            result = json.load(f)
        if remeasured:
            result["model"].update(remeasured, remeasured_from=os.path.basename(args.micro))
        result["model"].update(predict(result))
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        for c in result["model"]["cases"]:
            paired = f"; per repetition {c['error_paired']:+.0%}" if "error_paired" in c else ""
            if "error_micro" in c:
                paired += f"; micro host rates {c['error_micro']:+.0%}"
            print(f"{result['shape']:>9} batch {c['batch']} span {c['span_chunks']} {c['mode']:>8}: predicted "
                  f"{c['predicted_s']:.3f} s, measured {c['measured_s']:.3f} s ({c['error']:+.0%}{paired}, "
                  f"{c['bottleneck']})")
        line = (f"{path}: |error| median {result['model']['abs_error']['median']:.1%}, "
                f"max {result['model']['abs_error']['max']:.1%}")
        if "abs_error_paired" in result["model"]:
            line += (f"; per repetition (paired with its host sample) median "
                     f"{result['model']['abs_error_paired']['median']:.1%}, "
                     f"max {result['model']['abs_error_paired']['max']:.1%}")
        if "abs_error_micro" in result["model"]:
            line += (f"; with the micro-measured host costs median {result['model']['abs_error_micro']['median']:.1%}"
                     f", max {result['model']['abs_error_micro']['max']:.1%}")
        print(line)


if __name__ == "__main__":
    main()
