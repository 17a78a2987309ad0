"""Peak host memory of one training/inference mode, measured in a fresh process (run once per mode).

    python -m benchmarks.memory_probe --mode dszo --shape smollm2-135m --rows 4 --seq 64

How it measures (Linux): every mode imports the same libraries (torch, transformers, ds_zo → deepspeed) and builds the
same random-init model; then the kernel's resident-set high-water mark is reset to the current RSS
(`echo 5 > /proc/self/clear_refs`), the mode is set up (engine / optimizer) and runs `--steps` steps, and VmHWM is
read from /proc/self/status. So `peak_rss` is the true peak resident memory of the process while the mode runs (model,
libraries, buffers, activations, allocator slack), unaffected by the transient peak of model initialisation, and
`working = peak_rss − rss_after_build` is what the mode adds on top of the model. Prints one JSON line.

--device cuda (a GPU: the model in --dtype, bf16 by default there): the figure is the GPU's, torch's peak allocated
bytes (`peak_gpu`, reset once the model is built on the host) — for inference and MeZO's loop the model is moved to
the GPU first, so every mode's peak counts the parameters it holds there (ds_zo all-resident: all of them; ds_zo
with offload: the resident units and the pipeline's buffers) plus its working memory.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys

# dszo_row_blocks / dszo_whole_copies: zero_order.row_blocks "on" / "off" (the embedding and output layer from row
# blocks, the default's path / from whole copies); dszo_span<N>: the accelerator span set to N chunks instead of the
# engine's choice (accelerator_span_chunks; the same as dszo on CPU, whose span does not depend on it)
TRACE_ENTRIES = 1_000_000       # --peak-breakdown: the allocator's trace keeps this many events (a ring)
SPAN_MODES = tuple(f"dszo_span{n}" for n in (1, 2, 4, 8))
MODES = ("inference", "inference_logits", "dszo", "dszo_offload", "dszo_tied_z", "dszo_row_blocks", "dszo_whole_copies",
         *SPAN_MODES, "mezo", "adamw")


def peak_breakdown(trace: list, top: int = 12) -> dict:
    """What was allocated at the peak of a CUDA allocator trace (torch.cuda.memory._snapshot()["device_traces"][0],
    recorded with Python stacks): the trace replayed alloc by free (a block counts as allocated until its free
    completes, as the allocator's own statistics count it), the live blocks at the highest total grouped by where
    they were made: the innermost frame in ds_zo, transformers or benchmarks code, and the function that allocated."""
    live: dict = {}
    total = best = 0
    at_best: dict = {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > best:
                best, at_best = total, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]

    def where(e) -> str:
        frames = e.get("frames") or []
        own = next((f for f in frames if any(k in f["filename"] for k in ("ds_zo/", "transformers/", "benchmarks/"))),
                   None)
        inner = f" ({frames[0]['name']})" if frames else ""
        if own is None:
            return "?" + inner
        tail = "/".join(own["filename"].split("/")[-2:])
        return f"{tail}:{own['line']} {own['name']}{inner}"

    groups: dict = {}
    for e in at_best.values():
        n, size = groups.get(where(e), (0, 0))
        groups[where(e)] = (n + 1, size + e["size"])
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])
    return {"peak_bytes": best, "blocks": len(at_best), "trace_events": len(trace),
            "top": [{"where": k, "blocks": n, "bytes": size} for k, (n, size) in ranked[:top]],
            "rest_bytes": sum(size for _, (_, size) in ranked[top:])}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (on CPU ds_zo draws that many z chunks "
                   "at once, so its scratch grows with them)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--peak-breakdown", dest="breakdown", action="store_true",
                   help="--device cuda: also record the allocator's trace and report what was allocated at the peak "
                        "(slower: every allocation keeps its Python stack)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    os.environ.setdefault("DS_ACCELERATOR", args.device)

    import torch
    import transformers  # noqa: F401  (every mode pays the same imports)

    import ds_zo
    from ds_zo.model.perturbed_copies import OUTPUT_ROLE
    from benchmarks.baselines import AdamWStep, InferenceForward, MeZOLoop, make_batch, zo_config
    from benchmarks.models import build

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    model = build(args.shape, dtype)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batch = make_batch(model.config.vocab_size, args.rows, args.seq)
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device")
        torch.cuda.reset_peak_memory_stats()
        if args.breakdown:
            torch.cuda.memory._record_memory_history(max_entries=TRACE_ENTRIES, stacks="python")
        if not args.mode.startswith("dszo"):       # ds_zo places the model itself (all of it, or its resident units)
            model = model.to("cuda")
            batch = {k: v.to("cuda") for k, v in batch.items()}
    gc.collect()
    rss_after_build = _status_kb("VmRSS")
    exact = reset_peak()
    if args.mode in ("inference", "inference_logits"):
        runner = InferenceForward(model, with_loss=args.mode == "inference").step
    elif args.mode.startswith("dszo"):
        cfg = zo_config(args.rows, tied_z_cache=args.mode == "dszo_tied_z")
        if args.mode in ("dszo_row_blocks", "dszo_whole_copies"):
            cfg["zero_order"]["row_blocks"] = "on" if args.mode == "dszo_row_blocks" else "off"
        if args.mode == "dszo_offload":
            cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu", "pin_memory": cuda}}
        engine, *_ = ds_zo.initialize(model=model, config=cfg)
        out_span = engine.perturbations.accelerator_span_chunks
        if args.mode in SPAN_MODES:
            engine.perturbations.accelerator_span_chunks = int(args.mode.removeprefix("dszo_span"))
        runner = engine.train_batch
    elif args.mode == "mezo":
        runner = MeZOLoop(model).step
    else:
        runner = AdamWStep(model).step
    del model
    for _ in range(args.steps):
        runner(batch)
    gc.collect()
    out = {"mode": args.mode, "shape": args.shape, "rows": args.rows, "seq": args.seq, "steps": args.steps,
           "rss_after_build": rss_after_build, "peak_rss": _status_kb("VmHWM"),
           "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "hwm_reset": exact}
    out["working"] = out["peak_rss"] - rss_after_build
    if cuda:
        torch.cuda.synchronize()
        out.update(device="cuda", dtype=str(dtype).removeprefix("torch."), model_bytes=model_bytes,
                   peak_gpu=torch.cuda.max_memory_allocated())
        if args.breakdown:
            try:
                trace = torch.cuda.memory._snapshot()["device_traces"][0]
                out["peak_breakdown"] = peak_breakdown(trace)
                if len(trace) >= TRACE_ENTRIES:     # the oldest events were dropped: the replay misses their blocks
                    out["peak_breakdown"]["error"] = f"the trace kept only its last {TRACE_ENTRIES} events"
            except Exception as e:      # a diagnosis: the figure above stands without it
                out["peak_breakdown"] = {"error": f"{type(e).__name__}: {e}"}
            torch.cuda.memory._record_memory_history(enabled=None)
    if args.mode.startswith("dszo"):
        # where ds_zo's working memory sits: the grow-only copy buffers (θ±εz per slot, sized by the largest unit;
        # row blocks; cached ε·z chunks) and the float32 span scratch the update and the copies' ε·z share
        kept = engine.copies.buffers.nbytes(OUTPUT_ROLE)
        out["span_chunks"] = {"engine": out_span, "used": engine.perturbations.accelerator_span_chunks}
        out["dszo_buffers"] = {
            "perturbed_copies": engine.copies.buffers.nbytes() - kept,
            "kept_logits": kept,
            "span_scratch": engine.perturbations.span_scratch_nbytes(),
            "z_chunk_scratch": sum(t.numel() * t.element_size()
                                   for t in getattr(engine.perturbations, "_scratch", {}).values()),
            "offload_device_buffers": engine.pipeline.nbytes_device() if engine.pipeline is not None else 0,
            "largest_parameter_elements": max(p.numel() for p in engine.module.parameters()),
        }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
