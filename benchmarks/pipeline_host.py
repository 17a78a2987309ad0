"""The offload pipeline's own host time per unit visit, and its primitives, on this machine's device.

    python -m benchmarks.pipeline_host [--layers 24] [--passes 30] [--reps 7] [--out FILE]

On a host-bound GPU step (OPT-1.3B on the lent machines) what the pipeline adds to a step is host time: its
`begin`/`enter`/`exit` took 0.27-0.39 ms per unit visit in the seventh session's diagnosis. This times exactly that
work, without a model: passes over the units of a narrow OPT-shaped model (so its copies take microseconds), each
unit entered, marked changed and left, as a ZO step visits it. Beside it, per call, the primitives a visit is made of,
each side by side with what it replaced (interleaved repetitions):
- a stream switch: `torch.cuda.stream(s)` against `Streams.on(s)` (made once per stream);
- an event: a new `torch.cuda.Event` recorded against one recorded again;
- pointing 16 parameters at other tensors (`p.data = t`): the pipeline does it twice per visit, the dual forward
  once per slot and once back.
CPU runs the same pipeline with no-op streams (its Python bookkeeping and the copies only). For the pipeline of an
older tree, run this file with that tree first on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def primitives(device: torch.device, reps: int, calls: int = 2000) -> dict:
    """Median µs per call of each primitive and of what it replaced, the two interleaved."""
    from ds_zo.offload.streams import Streams
    params = [torch.nn.Parameter(torch.zeros(64, device=device)) for _ in range(16)]
    a = [torch.zeros(64, device=device) for _ in params]
    b = [torch.zeros(64, device=device) for _ in params]

    def point():
        for p, t in zip(params, a):
            p.data = t
        for p, t in zip(params, b):
            p.data = t

    arms = {"point_16_params_twice": point}
    if device.type == "cuda":
        streams = Streams(device, overlap=True)
        h2d = streams.h2d
        kept = streams.event()

        def torch_stream():
            with torch.cuda.stream(h2d):
                pass

        def switch():
            with streams.on(h2d):
                pass

        def new_event():
            torch.cuda.Event().record(h2d)

        def reused_event():
            kept.record(h2d)
        arms.update(torch_cuda_stream_context=torch_stream, streams_on=switch, new_event_recorded=new_event,
                    reused_event_recorded=reused_event)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for fn in arms.values():
        _per_call_us(fn, calls // 10)                  # first-call costs
    for _ in range(reps):
        for name, fn in arms.items():
            times[name].append(_per_call_us(fn, calls))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {name: statistics.median(ts) for name, ts in times.items()}


def pipeline_visit_us(device: torch.device, layers: int, passes: int, reps: int) -> dict:
    """Host µs per unit visit (begin, then enter and exit of every unit, each marked changed) of OffloadPipeline."""
    from benchmarks.host_path import model
    from ds_zo.model.units import cut_into_units
    from ds_zo.offload.pipeline import OffloadPipeline
    from ds_zo.offload.store import ParameterStore
    m = model(layers)
    units = [u for u in cut_into_units(m, {n for n, _ in m.named_parameters()}) if u.is_layer]
    store = ParameterStore(units, None, pin=device.type == "cuda")
    pipe = OffloadPipeline(store, units, device)

    def one_pass():
        pipe.begin()
        for u in units:
            pipe.enter(u)
            pipe.exit(u, True)

    for _ in range(5):
        one_pass()
    pipe.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(passes):
            one_pass()
        times.append((time.perf_counter() - t0) / passes / len(units) * 1e6)   # host time: no sync inside
        pipe.synchronize()
    return {"units": len(units), "unit_params": len(store[units[0]].params),
            "unit_bytes": store[units[0]].nbytes, "median_us": statistics.median(times), "min_us": min(times),
            "max_us": max(times)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--passes", type=int, default=30)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--device", default=None, help="default: cuda:0 where CUDA is present, else cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(1)
    import ds_zo
    result = {"command": "python -m benchmarks.pipeline_host " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": str(device), "ds_zo": ds_zo.__file__,
              "pipeline_visit": pipeline_visit_us(device, args.layers, args.passes, args.reps),
              "primitive_us": primitives(device, args.reps)}
    v = result["pipeline_visit"]
    print(f"pipeline host time per unit visit on {device} ({v['units']} units of {v['unit_params']} parameters, "
          f"{v['unit_bytes']} bytes; ds_zo from {result['ds_zo']}): {v['median_us']:.1f} µs "
          f"[{v['min_us']:.1f}, {v['max_us']:.1f}]")
    for name, us in result["primitive_us"].items():
        print(f"  {name:28s} {us:7.2f} µs per call")
    if args.out:
        from benchmarks.offload_bench import write_json
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
