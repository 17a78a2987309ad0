"""Markdown tables from a benchmarks.run JSON (for docs/performance.md).

    python -m benchmarks.tables outputs/bench_full.json
"""
from __future__ import annotations

import json
import sys


def _r(s: dict, d: int = 2) -> str:
    return f"{s['median']:.{d}f} [{s['min']:.{d}f}, {s['max']:.{d}f}]"


def _mb(x: float) -> str:
    return f"{x / 1e6:,.0f}"


def step_tables(res: dict) -> list[str]:
    out = []
    runs = [res["step"]] + res.get("step_more", [])
    out.append("| shape, tokens/step, threads | ds_zo step (s) | MeZO loop (s) | inference fwd (s) | ds_zo / MeZO "
               "(CPU time) | ds_zo / MeZO (wall) |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    for s in runs:
        kind = "cpu" if s["threads"] == 1 else "wall"
        out.append(f"| {s['shape']}, {s['rows']}x{s['seq']}, {s['threads']} | {_r(s[kind]['dszo'])} | "
                   f"{_r(s[kind]['mezo'])} | {_r(s[kind]['inference'])} | "
                   f"{_r(s['ratio_dszo_over_mezo_cpu']) if s['threads'] == 1 else 'n/a'} | "
                   f"{_r(s['ratio_dszo_over_mezo_wall'])} |")
    s = res["step"]
    extra = []
    if "mezo_published" in s["cpu"]:
        extra.append(f"MeZO with its published expressions (`p.data = p.data + s*z*eps`): "
                     f"{_r(s['cpu']['mezo_published'])} s, ds_zo / it = {_r(s['ratio_dszo_over_mezo_published_cpu'])}")
    if "adamw" in s["cpu"]:
        extra.append(f"AdamW step (forward + backward + update): {_r(s['cpu']['adamw'])} s")
    extra.append(f"offload (ZO2 pipeline) / resident: {_r(s['ratio_offload_over_resident_cpu'], 3)}")
    extra.append(f"z elements drawn per parameter per step: ds_zo {s['z_per_param']['dszo']:.3f}, "
                 f"MeZO loop {s['z_per_param']['mezo']:.3f}")
    out.append("")
    out += [f"- {e}" for e in extra]
    out.append("")
    out.append("| where one step's CPU time goes (cProfile) | ds_zo (s) | MeZO loop (s) |")
    out.append("| --- | --- | --- |")
    pd, pm_ = s["profile"]["dszo"]["groups"], s["profile"]["mezo"]["groups"]
    for g in sorted(set(pd) | set(pm_), key=lambda g: -(pd.get(g, 0) + pm_.get(g, 0))):
        out.append(f"| {g} | {pd.get(g, 0):.3f} | {pm_.get(g, 0):.3f} |")
    out.append(f"| total (profiled) | {s['profile']['dszo']['total_s']:.3f} | {s['profile']['mezo']['total_s']:.3f} |")
    return out


def memory_tables(res: dict) -> list[str]:
    m = res["memory"]
    out = ["| mode | peak RSS (MB) | above the built model (MB) | peak / inference |", "| --- | --- | --- | --- |"]
    for mode in m["peak_rss"]:
        ratio = "1" if mode == "inference" else _r(m[f"ratio_{mode}_over_inference"], 3)
        out.append(f"| {mode} | {_mb(m['peak_rss'][mode]['median'])} | {_mb(m['working'][mode]['median'])} | "
                   f"{ratio} |")
    b = m.get("dszo_buffers")
    if b:
        out.append("")
        # records before the eleventh session kept the update's scratch apart ("update_scratch")
        span = b.get("span_scratch", b.get("update_scratch", 0))
        out.append(f"ds_zo's buffers after two steps: perturbed copies (row blocks of the embedding/head copies, "
                   f"cached ε·z chunks; the decoder-layer copies are freed while the head computes) "
                   f"{_mb(b['perturbed_copies'])} MB, float32 span scratch of the update and the copies' ε·z (the "
                   f"largest parameter has {b['largest_parameter_elements']:,} elements) {_mb(span)} MB.")
    return out


def dist_tables(res: dict) -> list[str]:
    d = res["dist"]
    out = ["| figure | CPU time | wall time |", "| --- | --- | --- |"]
    if "ddp_weak_throughput_2_over_1_alone_cpu" in d:
        out.append(f"| ZO-DDP throughput, 2 ranks / 1 (same rows per rank), each launch one engine | "
                   f"{_r(d['ddp_weak_throughput_2_over_1_alone_cpu'])} | "
                   f"{_r(d['ddp_weak_throughput_2_over_1_alone_wall'])} |")
    for key, label in (("ddp_weak_throughput_2_over_1", "ZO-DDP throughput, 2 ranks / 1 (same rows per rank)"),
                       ("ddp_strong_speedup_2_over_1", "ZO-DDP speedup, 2 ranks / 1 (same global batch)"),
                       ("pertp_latency_2_over_1", "PertP step latency, 2 ranks / 1 (same batch)")):
        out.append(f"| {label} | {_r(d[key + '_cpu'])} | {_r(d[key + '_wall'])} |")
    out.append("")
    out.append("| case | ranks | step CPU (s) | step wall (s) |")
    out.append("| --- | --- | --- | --- |")
    for name in d["step_s"]["cpu"]:
        world = d["bytes_per_step"][name]["world"]
        out.append(f"| {name} | {world} | {_r(d['step_s']['cpu'][name], 3)} | {_r(d['step_s']['wall'][name], 3)} |")
    out.append("")
    out.append("| layout | ranks | H2D | D2H | all-gather received | all-reduce | = analytic |")
    out.append("| --- | --- | --- | --- | --- | --- | --- |")
    for name, v in d["bytes_per_step"].items():
        m = v["measured"]
        out.append(f"| {name} | {v['world']} | {m['h2d_bytes']:,.0f} | {m['d2h_bytes']:,.0f} | "
                   f"{m['allgather_bytes']:,.0f} | {m['allreduce_bytes']:,.0f} | {'yes' if v['match'] else 'NO'} |")
    return out


def model_tables(res: dict) -> list[str]:
    mo = res["model"]
    out = ["| measured step | tokens/rank | predicted (s) | measured CPU (s) | error | measured wall (s) | error |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in mo["validation"]:
        out.append(f"| {v['case']} ({v['shape']}) | {v['tokens_per_rank']} | {v['predicted_s']:.3f} | "
                   f"{v['measured_cpu_s']:.3f} | {v['error_vs_cpu']:+.1%} | {v['measured_wall_s']:.3f} | "
                   f"{v['error_vs_wall']:+.1%} |")
    out.append("")
    out.append(f"|error| vs CPU time: median {mo['abs_error_vs_cpu']['median']:.1%}, max "
               f"{mo['abs_error_vs_cpu']['max']:.1%}.")
    p = mo["prediction"]
    out.append("")
    out.append("| layout (OPT-175B, 16x256 tokens/step) | as built: step (s) | speedup | bottleneck | unfused "
               "passes: step (s) | speedup | bottleneck |")
    out.append("| --- | --- | --- | --- | --- | --- | --- |")
    for name, a in p["table"]["as_built"].items():
        f = p["table"]["unfused"][name]
        out.append(f"| {name} | {a['step_s']:.2f} | {a['speedup']:.2f}x | {a['bottleneck']} | {f['step_s']:.2f} | "
                   f"{f['speedup']:.2f}x | {f['bottleneck']} |")
    out.append("")
    out.append("| scenario | ZO2 step (s), bound | reslice 8 GPUs step (s), bound | reslice speedup | naive 8 "
               "speedup |")
    out.append("| --- | --- | --- | --- | --- |")
    for s in p["sensitivity"]:
        out.append(f"| {s['case']} | {s['zo2_s']:.2f}, {s['zo2_bottleneck']} | {s['reslice8_s']:.2f}, "
                   f"{s['reslice8_bottleneck']} | {s['reslice8_speedup']:.2f}x | {s['naive8_speedup']:.2f}x |")
    out.append("")
    out.append("| GPUs | " + " | ".join(p["as_built"]["curves"]) + " |")
    out.append("| --- |" + " --- |" * len(p["as_built"]["curves"]))
    counts = sorted({c["gpus"] for cur in p["as_built"]["curves"].values() for c in cur})
    for n in counts:
        cells = []
        for cur in p["as_built"]["curves"].values():
            c = next((c for c in cur if c["gpus"] == n), None)
            cells.append(f"{c['speedup']:.2f}x ({c['bottleneck']})" if c else "—")
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    return out


def markdown(res: dict) -> str:
    parts = []
    for key, fn in (("step", step_tables), ("memory", memory_tables), ("dist", dist_tables), ("model", model_tables)):
        if key in res:
            parts.append("\n".join(fn(res)))
    return "\n\n".join(parts)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))
