"""The figures issue #6 still needs from a GPU, read from the GPU check's output folder, in a few lines.

    python -m benchmarks.gpu_summary /tmp/gpu_check
    python -m benchmarks.gpu_summary --repredict benchmarks/results/gpu_h200_2026-11-26j   # today's ds_zo.perfmodel
    python -m benchmarks.gpu_summary --repredict-fused benchmarks/results/gpu_h200_2026-11-27e   # with fused kernels

For each offload_bench result (the OPT runs; SmolLM2 with zero_order.row_blocks "off"): offload / resident (or
whole copies / default; older records: row blocks / default) throughput, each mode's peak GPU memory, and with
--calibrate the model's error per case — with the host costs fitted to the calibration steps and with the
micro-measured ones — beside the profiled kernel time
against the modelled compute time (which side of the model misses) and the draws' queued rate against the old
back-to-back one. For the GPU memory section of benchmarks.run: each mode's peak and the ratios to inference.
--repredict: the model's cases from the calibration stored in each record, by the current ds_zo.perfmodel (a record
keeps the predictions of the model it ran with). --repredict-fused: the same with the fused Triton passes switched on
for the prediction (host costs still fitted to the record's own, unfused, calibration steps): what the model expects
them to buy on that host.
"""
from __future__ import annotations

import glob
import json
import os
import sys


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:+.0%}"


def offload_lines(name: str, r: dict) -> list[str]:
    cut = " (partial: the check's time ran out before this benchmark ended)" if r.get("partial") else ""
    out = [f"{name}: {r.get('shape')} {r.get('dtype')} seq {r.get('seq')}, {r.get('gpu', r.get('device'))}{cut}"]
    for run in r.get("runs", []):
        ratios = ", ".join(f"{k.removesuffix('_over_resident_throughput')} / resident {v:.3f}"
                           for k, v in run.items() if k.endswith("_over_resident_throughput"))
        steps = ", ".join(f"{k.removesuffix('_step_s_median')} {v * 1e3:.1f} ms"
                          for k, v in run.items() if k.endswith("_step_s_median"))
        span = f" span {run.get('span_chunks')}" if len({x.get("span_chunks") for x in r["runs"]}) > 1 else ""
        out.append(f"  batch {run['batch']}{span}: " + "; ".join(x for x in (ratios, f"step medians {steps}") if x))
    peaks = {k.removesuffix("_peak_gpu_GB"): v for k, v in r.items()
             if k.endswith("_peak_gpu_GB") and "_process_" not in k}
    if peaks:
        out.append("  peak GPU memory (GB): " + ", ".join(f"{m} {v:.2f}" for m, v in peaks.items()))
    same = [f"{k} {r[k]}" for k in ("params_identical", "whole_copies_params_identical", "chunked_z_params_identical",
                                     "row_blocks_params_identical") if k in r]
    for variant in ("whole_copies", "row_blocks"):      # the second in records before the tenth session
        if f"{variant}_max_param_diff" in r:
            same.append(f"{variant.replace('_', ' ')}' largest parameter difference "
                        f"{r[variant + '_max_param_diff']:.2e}")
    if same:
        out.append("  " + ", ".join(same))
    cp = r.get("memcpy") or {}
    if "h2d_duplex_GBps" in cp:
        out.append(f"  pinned memcpy GB/s: h2d {cp['h2d_GBps']:.1f} alone, {cp['h2d_duplex_GBps']:.1f} beside d2h; "
                   f"d2h {cp['d2h_GBps']:.1f} alone, {cp['d2h_duplex_GBps']:.1f} beside h2d")
    model = r.get("model")
    if model:
        micro = model.get("micro", {})
        samples = model.get("host_rate_samples") or []
        if "rng_rate_chunked" in micro:
            def host_us(key: str) -> str:
                vals = sorted(x[key] for x in samples if key in x)
                return f"{vals[len(vals) // 2] * 8e6:.0f} us" if vals else "n/a"
            out.append(f"  z sampler: counter-based {micro['rng_rate']:.3g} values/s, chunked "
                       f"{micro['rng_rate_chunked']:.3g} (device, queued); host per span fill "
                       f"{host_us('host_fill_in_span_s')} vs {host_us('host_fill_in_span_chunked_s')}")
        if "rng_rate_issue_bound" in micro:
            out.append(f"  z draws: {micro['rng_rate']:.3g} values/s queued (device), "
                       f"{micro['rng_rate_issue_bound']:.3g} back to back (the host's issue rate)")
        for c in model.get("cases", []):
            fit = c.get("host_fit") or {}
            host = (f"; fitted host {fit['unit_host_s'] * 1e3:.2f} ms/unit, {fit['host_chunk_s'] * 1e6:.1f} us/chunk"
                    if fit else "")
            kernels = c.get("measured_kernel_s")
            device = (f"; kernels {kernels:.3f} s vs modelled compute {c['busy'].get('compute', 0):.3f} s"
                      if kernels is not None else "")
            micro_err = f"; micro host costs {_pct(c['error_micro'])}" if "error_micro" in c else ""
            out.append(f"  model batch {c['batch']} {c['mode']}: predicted {c['predicted_s']:.3f} s, measured "
                       f"{c['measured_s']:.3f} s ({_pct(c['error'])}{micro_err}; per repetition "
                       f"{_pct(c.get('error_paired'))}; {c['bottleneck']}){host}{device}")
        for key, label in (("abs_error", "as predicted"), ("abs_error_paired", "each repetition from its own sample"),
                           ("abs_error_micro", "with the micro-measured host costs")):
            if model.get(key):
                out.append(f"  |error| {label}: median {model[key]['median']:.1%}, max {model[key]['max']:.1%}")
    return out


def memory_lines(name: str, sections: list[dict]) -> list[str]:
    out = []
    for m in sections:
        key = m.get("measure", "peak_rss")
        out.append(f"{name}: {m['shape']} {m['rows']}x{m['seq']} on {m.get('device', 'cpu')}, {key} (MB): " + ", ".join(
            f"{mode} {v['median'] / 1e6:.0f}" for mode, v in m[key].items()))
        out.append("  " + ", ".join(f"{k.removeprefix('ratio_')} {v['median']:.3f}"
                                    for k, v in m.items() if k.startswith("ratio_")))
        if m.get("failed"):
            out.append("  failed: " + ", ".join(m["failed"]))
    return out


def summary(folder: str, repredict: bool = False, fused: bool = False) -> list[str]:
    lines = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        name = os.path.basename(path)
        if "runs" in r and "shape" in r:
            if repredict and r.get("model"):
                from benchmarks.device_calibrate import predict
                r["model"] = r["model"] | predict(r, {"fused_kernels": True} if fused else None)
                name += " (re-predicted with the fused kernels)" if fused else " (re-predicted)"
            lines += offload_lines(name, r)
        elif "gpu_memory" in r:
            lines += memory_lines(name, r["gpu_memory"])
    return lines


def main(argv=None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    fused = "--repredict-fused" in args
    repredict = fused or "--repredict" in args
    args = [a for a in args if a not in ("--repredict", "--repredict-fused")]
    if len(args) != 1 or not os.path.isdir(args[0]):
        raise SystemExit("usage: python -m benchmarks.gpu_summary [--repredict | --repredict-fused] FOLDER (the GPU "
                         "check's output)")
    lines = summary(args[0], repredict, fused)
    print("\n".join(lines) if lines else f"no GPU check results in {args[0]}")


if __name__ == "__main__":
    main()
