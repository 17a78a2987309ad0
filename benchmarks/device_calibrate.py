"""Calibrate ds_zo.perfmodel for the device a benchmark runs on (a GPU; on CPU the same code runs, for tests), from
micro-measurements in the benchmark's own process, then predict the ZO steps that process timed. No ZO step of the
predicted shape is used to calibrate, so the comparison is a check of the model, not a fit.

Device rates are timed on the device (CUDA events; wall time after a synchronize on CPU); host rates are the host's
issue time of many back-to-back calls (on CUDA the kernels queue behind, so issuing is what the host pays):
- rng_rate: drawing a 2^20-element float32 buffer (one ds_zo z chunk), device time: torch normal_ on CUDA, ds_zo's
  sampler on CPU (PerturbationGenerator.draw_chunks: the native vectorised mt19937 where it is built);
- host_pass_s: host time to issue one small element-wise op as ds_zo does (torch.add of slices into a slice);
- host_chunk_s: host time per chunk to issue ds_zo's PerturbationGenerator.fill of a span of 8 chunks (key, seeding,
  launch; on CPU, where the draw itself runs on the host: one chunk's fill minus the draw);
- elem_bw: torch.add(x, y, out=o) over 64M float32 elements (12 bytes each); merge_bw: torch.cat of two of them;
- flops: a plain forward of the benchmark's model at the rows the dual forward computes (2 x batch), over the shape's
  analytic FLOPs (attention, norms, the loss and HF's module code are folded in);
- unit_host_s: ds_zo's host time per unit visit, from ZO steps of the 4-layer "tiny" shape at 1 x 8 tokens on the
  same device, where device work is negligible: (measured − modelled without it) / unit visits;
- h2d_bw / d2h_bw: the pinned memcpy baseline the benchmark measured (CUDA) or a host copy (CPU).
The host's speed drifts on the GPU machines (the same step 0.125-0.209 s within one process), so offload_bench
measures the host rates and the tiny steps again before each repetition of its timed steps and uses their medians.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from ds_zo import perfmodel as pm
from ds_zo.perturb import CHUNK_ELEMENTS, PerturbationGenerator


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
    host_normal = host_issue_time(lambda: chunk.normal_(generator=gen), device, 200)
    # one element-wise op as ds_zo issues it: into a slice of a buffer, from slices
    small = torch.empty(3 * 4096, device=device)
    host_pass = host_issue_time(lambda: torch.add(small[:4096], small[4096:8192], out=small[8192:]), device, 200)
    return {"host_fill_s": host_fill, "host_fill_in_span_s": host_span, "host_normal_s": host_normal,
            "host_pass_s": host_pass}


def with_host_rates(micro: dict, rates: dict, device: torch.device) -> dict:
    """micro with its host issue times replaced by `rates` (host_rates' keys), and host_chunk_s derived from them:
    on CUDA a chunk's share of a span's fill; on CPU, where the draw runs on the host, a fill minus the draw."""
    out = micro | rates
    t_normal = CHUNK_ELEMENTS / micro["rng_rate"]
    cuda = device.type == "cuda"
    out["host_chunk_s"] = rates["host_fill_in_span_s"] if cuda else max(0.0, rates["host_fill_s"] - t_normal)
    return out


def micro_rates(device: torch.device, n: int = 64 << 20, reps: int = 5) -> dict:
    chunk = torch.empty(CHUNK_ELEMENTS, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    zgen = PerturbationGenerator()
    chunks = 64
    if device.type == "cuda":    # bare normal_: issuing it is quicker than the kernel, so the device time is its own
        t_normal = device_time(lambda: [chunk.normal_(generator=gen) for _ in range(chunks)], device, reps) / chunks
    else:
        t_normal = device_time(lambda: [zgen.draw_chunks([(chunk, 12345)]) for _ in range(chunks)], device, reps) / chunks
    x, y, o = (torch.randn(n, device=device) for _ in range(3))
    t_add = device_time(lambda: torch.add(x, y, out=o), device, reps)
    t_cat = device_time(lambda: torch.cat([x, y]), device, reps)
    out = {"rng_rate": CHUNK_ELEMENTS / t_normal, "elem_bw": 12 * n / t_add, "merge_bw": 8 * n / t_cat,
           "fused_passes": zgen.fuses(device, torch.float32)}
    if device.type != "cuda":
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
             device: torch.device | str, span_chunks: int = 1) -> pm.Hardware:
    """On CUDA host issue, copies and compute overlap (streams); on CPU everything runs in turn on the host."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    return pm.Hardware(f"{device.type}, calibrated", flops=flops, rng_rate=micro["rng_rate"],
                       elem_bw=micro["elem_bw"], h2d_bw=h2d_bw, d2h_bw=d2h_bw, gpus_per_node=1, overlap=cuda,
                       host_chunk_s=micro["host_chunk_s"], host_pass_s=micro.get("host_pass_s", 0.0) if cuda else 0.0,
                       span_chunks=span_chunks, unit_host_s=unit_host_s, dtype_bytes=dtype_bytes,
                       merge_bw=micro["merge_bw"], fused_passes=micro.get("fused_passes", False) and dtype_bytes == 4)


def predict(result: dict) -> dict:
    """ds_zo.perfmodel's step times for the runs an offload_bench result holds, from the calibration stored in it
    (result["model"]: micro, unit_overhead, forward), against the measured medians."""
    cal = result["model"]
    micro = cal["micro"]
    if "memcpy" in result:
        h2d, d2h = result["memcpy"]["h2d_GBps"] * 1e9, result["memcpy"]["d2h_GBps"] * 1e9
    else:
        h2d = d2h = micro["copy_bw"]
    flops = {f["rows"] // 2: f["flops"] for f in cal["forward"]}        # forward at 2 x batch rows
    nbytes = 2 if result["dtype"] == "bf16" else 4
    device = torch.device(result["device"])
    spec = pm.shape(result["shape"], result["seq"])
    # --calibrate samples the host before every repetition, run after run: sample k of run i is i * reps + k
    samples = cal.get("host_rate_samples") or []
    overhead = cal["unit_overhead"]

    def step_s(rates: dict, unit_host_s: float, b: int, span: int, layout) -> pm.Result:
        hw = hardware(rates, flops[b], h2d, d2h, nbytes, unit_host_s, result["device"], span)
        return pm.simulate(spec, hw, layout, pm.Workload(b, result["seq"]))

    cases = []
    for i, run in enumerate(result["runs"]):
        b = run["batch"]
        span = run.get("span_chunks", 1) if result["device"] == "cuda" else 1
        for mode, layout in (("resident", pm.Layout("resident")),
                             ("offload", pm.Layout("zo2", 1, 1, result.get("prefetch", 1)))):
            if f"{mode}_step_s_median" not in run:
                continue
            r = step_s(micro, overhead["unit_host_s"], b, span, layout)
            measured = run[f"{mode}_step_s_median"]
            case = {"batch": b, "span_chunks": run.get("span_chunks"), "mode": mode, "predicted_s": r.step_s,
                    "measured_s": measured, "error": r.step_s / measured - 1, "bottleneck": r.bottleneck,
                    "busy": r.busy}
            reps = run.get(f"{mode}_step_s_reps") or []
            if reps and len(samples) == len(result["runs"]) * len(reps):
                # each repetition against the prediction from the host rates sampled just before it (a drifting
                # host moves both); the per-unit overhead too where its tiny steps were kept per repetition
                per_rep = []
                for k, t in enumerate(reps):
                    rates = with_host_rates(micro, samples[i * len(reps) + k], device)
                    unit = unit_host_from(overhead, rates, i * len(reps) + k)
                    per_rep.append(step_s(rates, unit, b, span, layout).step_s / t - 1)
                case["error_per_rep"] = per_rep
                case["error_paired"] = statistics.median(per_rep)
            cases.append(case)
    errs = [abs(c["error"]) for c in cases]
    paired = [abs(c["error_paired"]) for c in cases if "error_paired" in c]
    out = {"cases": cases, "abs_error": {"median": statistics.median(errs), "max": max(errs)} if errs else None}
    if paired:
        out["abs_error_paired"] = {"median": statistics.median(paired), "max": max(paired)}
    return out


def unit_host_from(overhead: dict, rates: dict, sample: int) -> float:
    """The per-unit host overhead for one sampled repetition: from that repetition's tiny steps and host rates where
    they were kept (TinySteps.overhead's tiny_step_s_reps, forward_flops), else the calibration's median."""
    reps, tiny_flops = overhead.get("tiny_step_s_reps"), overhead.get("forward_flops")
    if not reps or tiny_flops is None or sample >= len(reps):
        return overhead["unit_host_s"]
    spec = pm.shape("tiny", 8)
    bare = hardware(rates, tiny_flops, float("inf"), float("inf"), 4, 0.0, overhead.get("device", "cuda"))
    modelled = pm.simulate(spec, bare, pm.Layout("resident"), pm.Workload(1, 8)).step_s
    return max(0.0, (reps[sample] - modelled) / len(spec.units))


class TinySteps:
    """ZO steps of the tiny shape at 1 x 8 tokens on this device, where device work is negligible: their time less
    the model's time without per-unit overhead, per unit visit, is ds_zo's host time per unit visit."""

    def __init__(self, device: torch.device):
        import ds_zo
        from benchmarks.baselines import zo_config
        from benchmarks.models import build
        self.device = device
        model = build("tiny")
        self.engine, *_ = ds_zo.initialize(model=model, config=zo_config(1))
        ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
        self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        self.time(1)                                 # warm-up

    def time(self, reps: int) -> list[float]:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            self.engine.train_batch(self.batch)
            _sync(self.device)
            times.append(time.perf_counter() - t)
        return times

    def overhead(self, micro: dict, times: list[float]) -> dict:
        measured = statistics.median(times)
        fwd = forward_rate(self.engine.module, "tiny", 2, 8)
        spec = pm.shape("tiny", 8)
        bare = hardware(micro, fwd["flops"], float("inf"), float("inf"), 4, 0.0, self.device)
        modelled = pm.simulate(spec, bare, pm.Layout("resident"), pm.Workload(1, 8)).step_s
        return {"tiny_step_s": measured, "tiny_steps": len(times), "tiny_modelled_without_overhead_s": modelled,
                "unit_host_s": max(0.0, (measured - modelled) / len(spec.units)), "forward_flops": fwd["flops"],
                "device": self.device.type}


def unit_overhead(micro: dict, device: torch.device, reps: int = 9) -> dict:
    """ds_zo's host time per unit visit on this device, from ZO steps of the tiny shape (1 x 8 tokens)."""
    tiny = TinySteps(device)
    return tiny.overhead(micro, tiny.time(reps))


def main(argv=None) -> None:
    """Re-run the model's predictions on stored offload_bench results (after a change to ds_zo.perfmodel), optionally
    with host and device rates measured again (--measure on the device, then --micro here)."""
    import argparse
    import json
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", nargs="*", help="offload_bench --calibrate JSON files (rewritten in place)")
    p.add_argument("--measure", metavar="OUT", help="measure micro rates and the unit overhead here, write them")
    p.add_argument("--micro", metavar="FILE", help="use the rates --measure wrote instead of the stored ones")
    args = p.parse_args(argv)
    if args.measure:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        micro = micro_rates(device)
        cal = {"micro": micro, "unit_overhead": unit_overhead(micro, device)}
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
            print(f"{result['shape']:>9} batch {c['batch']} span {c['span_chunks']} {c['mode']:>8}: predicted "
                  f"{c['predicted_s']:.3f} s, measured {c['measured_s']:.3f} s ({c['error']:+.0%}{paired}, "
                  f"{c['bottleneck']})")
        line = (f"{path}: |error| median {result['model']['abs_error']['median']:.1%}, "
                f"max {result['model']['abs_error']['max']:.1%}")
        if "abs_error_paired" in result["model"]:
            line += (f"; per repetition (paired with its host sample) median "
                     f"{result['model']['abs_error_paired']['median']:.1%}, "
                     f"max {result['model']['abs_error_paired']['max']:.1%}")
        print(line)


if __name__ == "__main__":
    main()
