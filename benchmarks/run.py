"""One runner for issue #6: ds_zo against the baselines users would pick instead, a validated performance model, and
its predictions for DistZO2 at scale. Prints a table and writes JSON.

    python -m benchmarks.run --quick --out outputs/bench_quick.json      # 3-6 minutes on 2 shared CPU cores
    python -m benchmarks.run --out outputs/bench_full.json               # about 11 minutes
    python -m benchmarks.run --sections step --out a.json                # the same in parts: each later part
    python -m benchmarks.run --sections memory --from a.json --out b.json   # keeps the sections it does not rerun
    python -m benchmarks.run --sections dist,model --from b.json --out full.json
    python -m benchmarks.tables full.json                                # markdown tables for docs/performance.md

Sections (each comparison interleaved: every repetition runs every side once, so all sides see the same noise;
median and [min, max] reported):
  step     ZO step time, ds_zo vs the MeZO in-place loop (benchmarks/baselines.py), same model, batch and process,
           one intra-op thread; z elements drawn per parameter per step; an inference forward and (full) an AdamW
           step beside them; a cProfile of one step of each, grouped into where the time goes.
  memory   peak RSS of a ZO step vs an inference forward vs MeZO vs AdamW, one fresh process per mode
           (benchmarks/memory_probe.py), on the SmolLM2-135M shape.
  dist     ZO-DDP 2 ranks vs 1 (throughput, one thread per rank: in launches that hold only that engine, and in
           the launches that step every case), PertP 2 vs 1 (step latency), per-rank bytes per step for every
           layout vs the analytic formulas (benchmarks/dist_bench.py, real processes).
  model    ds_zo.perfmodel calibrated from micro-measurements (benchmarks/calibrate.py), its predictions of the
           measured steps (error), then OPT-175B on 8x H100: ZO2 vs DistZO2 layouts, 1..16 GPUs, and a plot.
Times are process CPU time (what a dedicated core takes; this machine is shared with other jobs) and wall time;
ratios are given for both. The plot goes to docs/perf_scaling.png unless --plot says otherwise.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt(s: dict, digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def load() -> list[float]:
    return list(os.getloadavg())


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra) -> dict:
    """The environment for a fresh benchmark process: without the rank variables ds_zo.initialize set in this one
    (a child would otherwise try to bind this process's MASTER_PORT)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------------------------
# step time

def _time(fn, batch) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; CPU time of the whole process (every intra-op thread)."""
    w, c = time.perf_counter(), time.process_time()
    fn(batch)
    return time.perf_counter() - w, time.process_time() - c


PROFILE_GROUPS = [   # (group, predicate on (function name, caller file)) — first match wins
    # torch's sampler, or ds_zo's native one (whole chunks, or the marked groups of a chunk)
    ("z draws (normal_)", lambda f, c: "normal" in f or "draw_chunks" in f or "draw_groups" in f),
    # ds_zo's fused CPU passes: z drawn inside the sweep that forms θ±εz or applies the update
    ("z draws + element-wise, fused", lambda f, c: "perturb_pieces" in f or "update_pieces" in f),
    ("ZO element-wise (θ±εz, update)", lambda f, c: any(s in c for s in ("perturbed_copies", "optimizer.py",
                                                                          "perturb.py", "baselines.py"))),
    ("slot split/merge (torch.cat)", lambda f, c: "dual_forward" in c),
    # the streamed output layer's matmuls, which write straight into the loss's windows (loss.StreamedTokenLoss)
    ("forward (HF modules)", lambda f, c: "loss" in c and f == "<built-in method torch.mm>"),
    ("loss", lambda f, c: "loss" in c or "cross_entropy" in f),
    ("forward (HF modules)", lambda f, c: "transformers" in c or "torch/nn" in c or "linear" in f
     or "scaled_dot" in f),
]


def profile_groups(fn, batch) -> dict:
    """cProfile one call (thread CPU time) and attribute each builtin's own time to a group by its caller."""
    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    fn(batch)
    prof.disable()
    stats = pstats.Stats(prof).stats
    groups: dict[str, float] = {}
    total = 0.0
    for (file, _, name), (_, _, tt, _, callers) in stats.items():
        total += tt
        parts = callers.items() if callers else [((file, 0, name), (0, 0, tt, 0))]
        own = sum(v[2] for _, v in parts) or 1.0
        for (cfile, _, _), v in parts:
            share = tt * v[2] / own
            where = cfile if file == "~" else file
            group = next((g for g, pred in PROFILE_GROUPS if pred(name, where)), "Python overhead / other")
            groups[group] = groups.get(group, 0.0) + share
    return {"total_s": total, "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]))}


def bench_step(shape: str, rows: int, seq: int, reps: int, full: bool, threads: int = 1,
               offload: bool = True) -> dict:
    import torch

    import ds_zo
    from benchmarks.baselines import AdamWStep, InferenceForward, MeZOLoop, make_batch, zo_config
    from benchmarks.models import build

    torch.set_num_threads(threads)
    base = build(shape)
    n_params = sum(p.numel() for p in base.parameters())
    batch = make_batch(base.config.vocab_size, rows, seq)
    dszo, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=zo_config(rows))
    mezo = MeZOLoop(copy.deepcopy(base))
    runners = {"dszo": dszo.train_batch, "mezo": mezo.step, "inference": InferenceForward(copy.deepcopy(base)).step}
    if offload:
        off_cfg = zo_config(rows)
        off_cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu", "pin_memory": False}}
        off_engine, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=off_cfg)
        runners["dszo_offload"] = off_engine.train_batch
    if full:
        runners["mezo_published"] = MeZOLoop(copy.deepcopy(base), style="published").step
        runners["adamw"] = AdamWStep(copy.deepcopy(base)).step
    del base
    for fn in runners.values():      # warm-up: allocations; ds_zo's second step has the fused update pending
        fn(batch)
    dszo.train_batch(batch)
    if offload:
        runners["dszo_offload"](batch)
    walls = {k: [] for k in runners}
    cpus = {k: [] for k in runners}
    for _ in range(reps):
        for name, fn in runners.items():
            w, c = _time(fn, batch)
            walls[name].append(w)
            cpus[name].append(c)
    drawn0, mezo0 = dszo.perturbations.elements_drawn, mezo.elements_drawn
    dszo.train_batch(batch)
    mezo.step(batch)
    out = {"shape": shape, "rows": rows, "seq": seq, "tokens": rows * seq, "threads": threads, "reps": reps,
           "params": n_params,
           "wall": {k: summary(v) for k, v in walls.items()}, "cpu": {k: summary(v) for k, v in cpus.items()},
           "z_per_param": {"dszo": (dszo.perturbations.elements_drawn - drawn0) / n_params,
                           "mezo": (mezo.elements_drawn - mezo0) / n_params}}
    for kind, t in (("wall", walls), ("cpu", cpus)):
        out[f"ratio_dszo_over_mezo_{kind}"] = summary([a / b for a, b in zip(t["dszo"], t["mezo"])])
        if offload:
            out[f"ratio_offload_over_resident_{kind}"] = summary([a / b for a, b in zip(t["dszo_offload"],
                                                                                        t["dszo"])])
        if "mezo_published" in t:
            out[f"ratio_dszo_over_mezo_published_{kind}"] = summary(
                [a / b for a, b in zip(t["dszo"], t["mezo_published"])])
    if threads == 1:
        out["profile"] = {"dszo": profile_groups(dszo.train_batch, batch), "mezo": profile_groups(mezo.step, batch)}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# memory

def bench_memory(shape: str, rows: int, seq: int, reps: int,
                 modes=("inference", "inference_logits", "dszo", "mezo", "adamw"),
                 threads: int = 1, device: str = "cpu", concurrent: bool | None = None) -> dict:
    """Peak memory per mode, one fresh process each (benchmarks/memory_probe.py): the process's peak RSS on CPU, the
    GPU's peak allocated bytes with device="cuda" (bf16 there).

    On a GPU the probes of one repetition run at once: each figure is its own process's allocator peak, which other
    processes do not change, and a GPU check's minutes go to the probes' start-up (imports, model build), not to the
    GPU. On CPU they run one at a time: a process's RSS does not depend on the others either, but CI has 2 cores.
    Each probe's JSON line is printed as it ends. concurrent (default: on a GPU) runs a repetition's probes at once and
    records a failed probe (``failed``) without losing the others; one at a time, a failure raises."""
    if concurrent is None:
        concurrent = device == "cuda"
    key = "peak_gpu" if device == "cuda" else "peak_rss"
    runs = {m: [] for m in modes}
    failed = {}
    # ROOT first, then what this process had (the GPU machine carries deepspeed in via PYTHONPATH)
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = child_env(DS_ACCELERATOR=device, OMP_NUM_THREADS=str(threads), PYTHONPATH=pythonpath)

    def start(mode: str):
        # output to files, not pipes: probes running at once must not block on a full pipe while one is waited for
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.memory_probe", "--mode", mode, "--shape", shape,
                                 "--rows", str(rows), "--seq", str(seq), "--steps", "2", "--threads", str(threads),
                                 "--device", device], cwd=ROOT, env=env, stdout=out, stderr=err)
        return proc, out, err

    def finish(mode: str, started) -> None:
        proc, out, err = started
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        out.close()
        err.close()
        if proc.returncode != 0:
            failed[mode] = stderr[-2000:]
            print(f"memory probe {mode} failed (exit {proc.returncode}): {stderr[-500:]}", flush=True)
            return
        try:
            line = stdout.strip().splitlines()[-1]
            runs[mode].append(json.loads(line))
        except (IndexError, json.JSONDecodeError):
            failed[mode] = f"no result line in its output: {stdout[-500:]!r} {stderr[-1500:]}"
            print(f"memory probe {mode} printed no result", flush=True)
            return
        print(f"memory probe: {line}", flush=True)

    for _ in range(reps):
        if concurrent:
            procs = {mode: start(mode) for mode in modes}
            for mode, proc in procs.items():
                finish(mode, proc)
        else:
            for mode in modes:
                finish(mode, start(mode))
    if failed and not concurrent:
        # the CPU benchmark's ratios need every mode; the GPU check keeps what it got in its few minutes
        raise RuntimeError("memory probe(s) failed: " + "; ".join(f"{m}: {e}" for m, e in failed.items()))
    runs = {m: rs for m, rs in runs.items() if rs}
    modes = tuple(runs)
    out = {"shape": shape, "rows": rows, "seq": seq, "reps": reps, "threads": threads, "device": device,
           "measure": key, "runs": runs,
           "peak_rss": {m: summary([r["peak_rss"] for r in rs]) for m, rs in runs.items()},
           "working": {m: summary([r["working"] for r in rs]) for m, rs in runs.items()}}
    if device == "cuda":
        out["peak_gpu"] = {m: summary([r["peak_gpu"] for r in rs]) for m, rs in runs.items()}
    if failed:
        out["failed"] = failed
    if "dszo" in runs:
        out["dszo_buffers"] = runs["dszo"][-1].get("dszo_buffers")

    def ratio(a: str, b: str) -> dict:
        return summary([x[key] / y[key] for x, y in zip(runs[a], runs[b])])
    for m in modes:
        if m != "inference" and "inference" in runs:
            out[f"ratio_{m}_over_inference"] = ratio(m, "inference")
    for m in modes:
        if "inference_logits" in runs and m.startswith("dszo"):
            out[f"ratio_{m}_over_inference_logits"] = ratio(m, "inference_logits")
    if "adamw" in runs and "dszo" in runs:
        out["ratio_dszo_over_adamw"] = ratio("dszo", "adamw")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# multi-rank

def bench_dist(shape: str, rows: int, seq: int, steps: int, reps: int) -> dict:
    from benchmarks.dist_bench import run_world, step_times
    spec = {"shape": shape, "rows": rows, "seq": seq, "steps": steps, "cases": [], "calibrate": True}
    runs = []
    for _ in range(reps):
        for world in (1, 2):
            runs.append(run_world(world, spec))
    ones = [r for r in runs if r["world"] == 1]
    twos = [r for r in runs if r["world"] == 2]
    t = {kind: {} for kind in ("wall", "cpu")}
    for r in runs:
        for name, case in r["cases"].items():
            st = step_times(case)
            for kind in t:
                t[kind].setdefault(name, []).append(st[kind])
    out = {"shape": shape, "rows_per_rank": rows, "seq": seq, "steps": steps, "reps": reps,
           "step_s": {kind: {n: summary(v) for n, v in d.items()} for kind, d in t.items()},
           "collectives": summary([r["collectives"]["allgather_Bps"] for r in twos]),
           "allreduce_latency_s": summary([r["collectives"]["allreduce_latency_s"] for r in twos])}
    for kind, d in t.items():
        # pairs (1-rank run i, 2-rank run i) were launched back to back
        out[f"ddp_weak_throughput_2_over_1_{kind}"] = summary([2 * a / b for a, b in zip(d["single"], d["ddp"])])
        out[f"ddp_strong_speedup_2_over_1_{kind}"] = summary([a / b for a, b in zip(d["single_2b"], d["ddp"])])
        out[f"pertp_latency_2_over_1_{kind}"] = summary([b / a for a, b in zip(d["single"], d["pertp"])])
    # the throughput pair on its own: launches that hold only the `single` or only the `ddp` engine, as a DDP job's
    # processes do. In the launches above every rank process also steps its other cases' engines in between (three
    # in a 1-rank process, four in a 2-rank one, each with its own model and buffers), which evict the working set
    # of the next case's step — unequally for the two sides
    alone = {kind: {"single": [], "ddp": []} for kind in ("wall", "cpu")}
    for _ in range(2 * reps):      # short launches, whose step times vary from process to process: twice as many
        for world, name in ((1, "single"), (2, "ddp")):
            st = step_times(run_world(world, dict(spec, cases=[name], calibrate=False))["cases"][name])
            for kind in alone:
                alone[kind][name].append(st[kind])
    for kind, d in alone.items():
        out[f"ddp_weak_throughput_2_over_1_alone_{kind}"] = summary([2 * a / b for a, b in zip(d["single"],
                                                                                                 d["ddp"])])
        out.setdefault("step_s_alone", {})[kind] = {n: summary(v) for n, v in d.items()}
    layouts = {}
    for r in (ones[-1], twos[-1]):
        for name, case in r["cases"].items():
            exact = all(abs(case["bytes"][k] - v) <= 1e-9 * max(1, v) for k, v in case["analytic"].items())
            layouts[name] = {"world": r["world"], "measured": case["bytes"], "analytic": case["analytic"],
                             "match": exact}
    out["bytes_per_step"] = layouts
    out["calibrations"] = [r["calibration"] for r in ones if "calibration" in r]
    # measured by both ranks of the 2-rank launches at once: what each rank's rates are while the other runs
    out["calibrations_2_ranks"] = [r["calibration"] for r in twos if "calibration" in r]
    out["load_during"] = load()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# performance model

def _median_calibration(cals: list[dict]) -> dict:
    """Element-wise median of several calibrations (one per 1-rank launch)."""
    def med(path):
        vals = []
        for c in cals:
            v = c
            for k in path:
                v = v[k]
            vals.append(v)
        return statistics.median(vals)
    first = cals[0]
    return {"micro": {k: med(("micro", k)) for k in first["micro"]},
            "forward": {r: {"flops": med(("forward", r, "flops"))} for r in first["forward"]},
            "overhead": {"unit_host_s": med(("overhead", "unit_host_s"))} if first.get("overhead") else None}


def bench_model(step: dict, dist: dict | None, plot_path: str | None) -> dict:
    import torch

    from benchmarks.calibrate import cpu_hardware, micro_rates, unit_overhead
    from ds_zo import perfmodel as pm

    torch.set_num_threads(1)
    micro = micro_rates()
    overhead = unit_overhead(micro)
    out = {"micro": micro, "unit_overhead": overhead, "validation": []}
    colls = None
    if dist:
        colls = {"allgather_Bps": dist["collectives"]["median"],
                 "allreduce_latency_s": dist["allreduce_latency_s"]["median"]}

    def check(label, shape_name, seq, layout, work, measured_cpu, measured_wall, hw):
        r = pm.simulate(pm.shape(shape_name, seq), hw, layout, work)
        out["validation"].append({"case": label, "shape": shape_name, "tokens_per_rank": r.per_rank_rows * seq,
                                  "predicted_s": r.step_s, "measured_cpu_s": measured_cpu,
                                  "measured_wall_s": measured_wall, "error_vs_cpu": r.step_s / measured_cpu - 1,
                                  "error_vs_wall": r.step_s / measured_wall - 1})

    # single process, the step section's shape; its forward rate comes from the inference runs timed beside it
    s = step
    fwd = {"flops": sum(u.flops_per_token for u in pm.shape(s["shape"], s["seq"]).units) * s["tokens"]
           / s["cpu"]["inference"]["median"]}
    out["forward_rate_" + s["shape"]] = fwd["flops"]
    hw = cpu_hardware(micro, fwd, colls, overhead["unit_host_s"])
    w = pm.Workload(s["rows"], s["seq"])
    check("resident ZO step, 1 process", s["shape"], s["seq"], pm.Layout("resident"), w,
          s["cpu"]["dszo"]["median"], s["wall"]["dszo"]["median"], hw)
    check("offload (ZO2 pipeline) ZO step, 1 process", s["shape"], s["seq"], pm.Layout("zo2"), w,
          s["cpu"]["dszo_offload"]["median"], s["wall"]["dszo_offload"]["median"], hw)
    if dist and dist.get("calibrations"):
        d = dist
        cal = _median_calibration(d["calibrations"])
        out["dist_calibration"] = cal
        # 2-rank runs with the rates both ranks measured at once (shared caches and memory bandwidth), where the
        # launches measured them; the per-unit Python cost is the 1-rank one
        cal2 = _median_calibration(d["calibrations_2_ranks"]) if d.get("calibrations_2_ranks") else cal
        out["dist_calibration_2_ranks"] = cal2
        b, seq = d["rows_per_rank"], d["seq"]

        def hw_rows(c, rows):
            return cpu_hardware(c["micro"], c["forward"][str(rows)], colls, cal["overhead"]["unit_host_s"])
        cases = [("single", "1 rank, b rows", pm.Layout("resident"), b, b),
                 ("single_2b", "1 rank, 2b rows", pm.Layout("resident"), 2 * b, 2 * b),
                 ("zo2", "1 rank, offload (ZO2 pipeline)", pm.Layout("zo2"), b, b),
                 ("ddp", "ZO-DDP 2 ranks", pm.Layout("resident", 2), 2 * b, b),
                 ("pertp", "PertP 2 ranks", pm.Layout("resident", 2, 2), b, b),
                 ("naive", "naive offload 2 ranks", pm.Layout("naive", 2), 2 * b, b),
                 ("reslice", "reslicing 2 ranks (k=2)", pm.Layout("reslice", 2), 2 * b, b)]
        for name, label, layout, rows, rank_rows in cases:
            check(label, d["shape"], seq, layout, pm.Workload(rows, seq), d["step_s"]["cpu"][name]["median"],
                  d["step_s"]["wall"][name]["median"], hw_rows(cal2 if layout.gpus > 1 else cal, rank_rows))
    errs = [abs(v["error_vs_cpu"]) for v in out["validation"]]
    out["abs_error_vs_cpu"] = {"median": statistics.median(errs), "max": max(errs)}
    out["prediction"] = predict_h100(plot_path)
    return out


def predict_h100(plot_path: str | None) -> dict:
    from ds_zo import perfmodel as pm

    rows, seq = 16, 256
    model = pm.shape("opt-175b", seq)
    work = pm.Workload(rows, seq)
    hw = pm.H100
    variants = (("as_built", hw), ("unfused", pm.H100_UNFUSED), ("chunked_z", pm.H100_CHUNKED_Z))
    out = {"model": "opt-175b", "rows": rows, "seq": seq, "hardware": hw.__dict__ | {"name": hw.name},
           "stored_GB": model.layer_params() * hw.dtype_bytes / 1e9}
    for label, h in variants:
        out[label] = pm.scaling(model, h, work)
    at8 = {}
    for label, h in variants:
        base = pm.simulate(model, h, pm.Layout("zo2"), work)
        rows8 = {}
        for name, lay in (("zo2 (1 GPU)", pm.Layout("zo2")), ("naive, 8 GPUs", pm.Layout("naive", 8)),
                          ("reslice DDP, 8 GPUs", pm.Layout("reslice", 8)),
                          ("reslice PertP2 x DDP4, 8 GPUs", pm.Layout("reslice", 8, 2)),
                          ("reslice DDP, 8 GPUs, prefetch_depth 2", pm.Layout("reslice", 8, 1, 2)),
                          ("reslice DDP, 16 GPUs (2 nodes)", pm.Layout("reslice", 16))):
            r = pm.simulate(model, h, lay, work)
            rows8[name] = {"step_s": r.step_s, "speedup": base.step_s / r.step_s, "bottleneck": r.bottleneck,
                           "busy": r.busy, "h2d_GB": r.bytes_per_step["h2d"] / 1e9,
                           "allgather_GB": r.bytes_per_step["allgather"] / 1e9}
        at8[label] = rows8
    out["table"] = at8
    sens = []
    for label, h, w in (("as built, 16x256", hw, work), ("as built, 16x2048", hw, pm.Workload(16, 2048)),
                        ("as built, 16x64", hw, pm.Workload(16, 64)),
                        ("host memory 250 GB/s", pm.with_(hw, host_bw=250e9), work),
                        ("host memory unlimited", pm.with_(hw, host_bw=float("inf")), work),
                        ("no host z-launch cost", pm.with_(hw, host_chunk_s=0.0), work),
                        ("fused kernels drawing z at 5e11/s", pm.with_(hw, fused_rng_rate=5e11), work),
                        ("unfused passes (the sixteenth session's build)", pm.H100_UNFUSED, work),
                        ("chunked z sampler (before the sixteenth session)", pm.H100_CHUNKED_Z, work)):
        m = pm.shape("opt-175b", w.seq)
        base = pm.simulate(m, h, pm.Layout("zo2"), w)
        r8 = pm.simulate(m, h, pm.Layout("reslice", 8), w)
        n8 = pm.simulate(m, h, pm.Layout("naive", 8), w)
        sens.append({"case": label, "zo2_s": base.step_s, "zo2_bottleneck": base.bottleneck,
                     "reslice8_s": r8.step_s, "reslice8_speedup": base.step_s / r8.step_s,
                     "reslice8_bottleneck": r8.bottleneck, "naive8_speedup": base.step_s / n8.step_s})
    out["sensitivity"] = sens
    for label, _ in variants:
        out[label]["saturates_at"] = {k: pm.saturation(c) for k, c in out[label]["curves"].items()}
    if plot_path:
        plot(out, plot_path)
        out["plot"] = plot_path
    return out


def plot(pred: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.0), sharey=True)
    for ax, label, title in ((axes[0], "as_built", "as built (fused kernels, counter-based z)"),
                             (axes[1], "unfused", "unfused passes (sixteenth session)")):
        names = {"naive": "naive DistZO2 (DDP, whole units over every PCIe link)",
                 "reslice": "reslicing, ZO-DDP", "reslice+pertp2": "reslicing, PertP 2 x ZO-DDP"}
        for name, curve in pred[label]["curves"].items():
            line, = ax.plot([c["gpus"] for c in curve], [c["speedup"] for c in curve], marker="o", ms=3,
                            label=names.get(name, name))
            if label == "unfused" and "chunked_z" in pred:      # the same layout with the GPUs' former sampler
                old = pred["chunked_z"]["curves"][name]
                ax.plot([c["gpus"] for c in old], [c["speedup"] for c in old], ls=":", lw=1, color=line.get_color(),
                        label=f"{names.get(name, name)}, chunked z (before)")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.axhline(3.0, color="red", lw=0.8, ls="--", label="DistZO2 published (3x at 8 GPUs)")
        ax.axvline(8, color="grey", lw=0.6, ls="--")
        ax.set_title(f"OPT-175B, {pred['rows']}x{pred['seq']} tokens/step: {title}", fontsize=9)
        ax.set_xlabel("H100 GPUs (8 per node)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup over ZO2 on 1 GPU (same global batch)")
    handles, labels = [], []
    for ax in axes:                     # each label once (the dotted chunked-z curves are on the second panel)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, fontsize=7.5, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------------------------------

def print_table(res: dict) -> None:
    rows = []
    st = res.get("step")
    if st:
        rows.append(("ZO step time ds_zo / MeZO loop (cpu)", fmt(st["ratio_dszo_over_mezo_cpu"]), "<= 0.8"))
        rows.append(("ZO step time ds_zo / MeZO loop (wall)", fmt(st["ratio_dszo_over_mezo_wall"]), "<= 0.8"))
        rows.append(("z elements drawn per parameter per step", f"ds_zo {st['z_per_param']['dszo']:.3f}, "
                     f"MeZO {st['z_per_param']['mezo']:.3f}", "<= 2"))
        rows.append(("offload / resident step time (cpu)", fmt(st["ratio_offload_over_resident_cpu"]), ""))
    for extra in res.get("step_more", []):
        rows.append((f"ds_zo / MeZO (cpu), {extra['rows']}x{extra['seq']}, {extra['threads']} thr",
                     fmt(extra["ratio_dszo_over_mezo_cpu"]), "<= 0.8"))
        rows.append((f"ds_zo / MeZO (wall), {extra['rows']}x{extra['seq']}, {extra['threads']} thr",
                     fmt(extra["ratio_dszo_over_mezo_wall"]), "<= 0.8"))
    for key, label in (("memory", ""), ("memory_2threads", ", 2 thr"), ("memory_16x64", ", 16x64")):
        me = res.get(key)
        if not me:
            continue
        rows.append((f"peak RSS ZO step / inference forward{label}", fmt(me["ratio_dszo_over_inference"]), "<= 1.1"))
        if "ratio_dszo_over_inference_logits" in me:
            # the forward without labels: no loss, so no log-softmax of the logits (HF's loss makes one)
            rows.append((f"peak RSS ZO step / logits-only forward{label}",
                         fmt(me["ratio_dszo_over_inference_logits"]), ""))
        rows.append((f"peak RSS MeZO loop / inference forward{label}", fmt(me["ratio_mezo_over_inference"]), ""))
        if "ratio_dszo_over_adamw" in me:
            rows.append(("peak RSS ZO step / AdamW step", fmt(me["ratio_dszo_over_adamw"]), ""))
    di = res.get("dist")
    if di:
        for kind in ("cpu", "wall"):
            if f"ddp_weak_throughput_2_over_1_alone_{kind}" in di:
                rows.append((f"ZO-DDP throughput 2 / 1 ranks ({kind}), alone",
                             fmt(di[f"ddp_weak_throughput_2_over_1_alone_{kind}"]), ">= 1.8"))
            rows.append((f"ZO-DDP throughput 2 / 1 ranks ({kind}), all cases",
                         fmt(di[f"ddp_weak_throughput_2_over_1_{kind}"]), ">= 1.8"))
        rows.append(("ZO-DDP strong speedup 2 / 1 (cpu)", fmt(di["ddp_strong_speedup_2_over_1_cpu"]), ""))
        rows.append(("PertP step latency 2 / 1 (cpu)", fmt(di["pertp_latency_2_over_1_cpu"]), ""))
        ok = all(v["match"] for v in di["bytes_per_step"].values())
        rows.append(("per-rank bytes per step == analytic", "all layouts" if ok else "MISMATCH", "exact"))
    mo = res.get("model")
    if mo:
        rows.append(("perf model |error| vs measured (cpu)", f"median {mo['abs_error_vs_cpu']['median']:.1%}, "
                     f"max {mo['abs_error_vs_cpu']['max']:.1%}", "<= 15%"))
        t = mo["prediction"]["table"]["as_built"]
        rows.append(("OPT-175B 8xH100 reslice DDP vs ZO2 (model)",
                     f"{t['reslice DDP, 8 GPUs']['speedup']:.2f}x", "published 3x"))
    width = max(len(r[0]) for r in rows) if rows else 10
    print()
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<34} {target}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller batches and fewer repetitions (a few minutes)")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--sections", default="step,memory,dist,model")
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "perf_scaling.png"))
    p.add_argument("--from", dest="prior", default=None,
                   help="JSON of an earlier run: its sections are kept where --sections does not rerun them (run "
                        "the full set in parts, each a few minutes)")
    args = p.parse_args(argv)
    import torch
    sections = args.sections.split(",")
    q = args.quick
    res: dict = {"command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": q,
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                             "load_at_start": load()}}
    if args.prior:
        with open(args.prior) as f:
            prior = json.load(f)
        for key in ("step", "step_more", "memory", "memory_2threads", "memory_16x64", "gpu_memory", "dist", "model"):
            if key in prior:
                res[key] = prior[key]
        res["parts"] = prior.get("parts", [prior.get("command")]) + [res["command"]]
    t0 = time.time()
    if "step" in sections:
        print("[run] step time ...", flush=True)
        res["step"] = bench_step("smollm2-135m", 4, 32 if q else 64, 3 if q else 5, full=not q)
        if not q:
            # the ratio's dependence on tokens per step (1 thread), and on two intra-op threads
            res["step_more"] = [bench_step("smollm2-135m", 16, 64, 3, full=False, offload=False),
                                bench_step("smollm2-135m", 4, 64, 3, full=False, threads=2, offload=False),
                                bench_step("smollm2-135m", 16, 64, 3, full=False, threads=2, offload=False)]
            for extra in res["step_more"]:
                extra.pop("profile", None)
    if "memory" in sections:
        print("[run] memory ...", flush=True)
        res["memory"] = bench_memory("smollm2-135m", 4, 64, 1 if q else 2)
        if not q:   # with two threads ds_zo draws two z chunks at once: its scratch doubles
            res["memory_2threads"] = bench_memory("smollm2-135m", 4, 64, 2, modes=("inference", "dszo", "mezo"),
                                                  threads=2)
            # 4x the tokens: the logits (both slots' at once in ds_zo) grow with the batch, the working copies don't
            res["memory_16x64"] = bench_memory("smollm2-135m", 16, 64, 1,
                                               modes=("inference", "inference_logits", "dszo", "mezo"))
    if "gpu_memory" in sections:
        # the GPU path (bf16): SmolLM2-135M's peak GPU memory per mode, ds_zo all-resident (the embedding and output
        # layer from row blocks, the default, at the engine's span, 2 chunks since the fifteenth session, and at 1, 4
        # (the eleventh to fourteenth sessions') and 8 (before); and from whole copies, row_blocks "off") and with
        # offload
        if not torch.cuda.is_available():
            raise SystemExit("--sections gpu_memory needs a CUDA device")
        print("[run] GPU memory ...", flush=True)
        modes = ("inference", "inference_logits", "dszo", "dszo_span1", "dszo_span4", "dszo_span8", "dszo_whole_copies",
                 "dszo_offload", "mezo")
        res["gpu_memory"] = [bench_memory("smollm2-135m", 4, 64, 1, modes=modes, device="cuda")]
        for m in res["gpu_memory"]:
            print(f"GPU peak (bf16, {m['rows']}x{m['seq']}): " + ", ".join(
                f"{mode} {v['median'] / 1e6:.0f} MB" for mode, v in m["peak_gpu"].items()) + "; " + ", ".join(
                f"{k.removeprefix('ratio_')} {v['median']:.3f}" for k, v in m.items() if k.startswith("ratio_")))
    if "dist" in sections:
        print("[run] multi-rank ...", flush=True)
        res["dist"] = bench_dist("small", 4, 64, 3 if q else 5, 2 if q else 3)
    if "model" in sections and "step" in res:
        res.pop("model", None)
        print("[run] performance model ...", flush=True)
        res["model"] = bench_model(res["step"], res.get("dist"), args.plot)
    res["machine"]["load_at_end"] = load()
    res["seconds"] = time.time() - t0
    print_table(res)
    print(f"\n({res['seconds']:.0f} s; load average at start {res['machine']['load_at_start']}, "
          f"at end {res['machine']['load_at_end']})")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
