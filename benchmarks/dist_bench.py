"""Multi-rank ZO step timings and per-rank bytes, with real processes (gloo over 127.0.0.1, one thread per rank).

    python -m benchmarks.dist_bench --shape small --rows 4 --seq 64 --worlds 1,2,1,2

Launches the worlds in the given order (interleaved: 1, 2, 1, 2, ... so both see the same machine noise); every rank
runs the cases of its world size one after another in one process (a second ds_zo.initialize reuses the process
group). Cases (b = --rows):
  world 1: single (b rows, both signs), single_2b (2b rows), zo2 (offload, b rows)
  world 2: ddp (b rows per rank: weak scaling; 2b global: strong scaling vs single_2b), pertp (b rows, one sign per
           rank, vs single), naive (offload, every rank moves whole units), reslice (ZeRO-3 + offload, k = 2)
Each case: 2 warm-up steps (so the fused update is pending and offloads happen), then --steps timed steps, each
started after a barrier; per rank and step the wall time and the process CPU time (all threads, gloo included).
Per-rank bytes per step are read from engine.comm_stats() over the timed steps and compared with the analytic
formulas computed here from the model's own parameter shapes: U = Σ bytes of the decoder layers (what offload
moves), S = Σ ceil(n/k)·bytes (a reslicing shard), all-reduce = 4q float64 values.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

from ds_zo.parallel.local_ranks import run_ranks

CASES = {
    1: [("single", {}, 1), ("single_2b", {}, 2), ("zo2", {"offload": True}, 1)],
    2: [("ddp", {}, 2), ("pertp", {"pertp": 2}, 1), ("naive", {"offload": True}, 2),
        ("reslice", {"offload": True, "stage": 3}, 2)],
}   # name, layout, global rows in units of b


# -- launcher ---------------------------------------------------------------------------------------------------------

def run_world(world: int, spec: dict, timeout: float = 600) -> dict:
    """Run the worker as `world` ranks; returns rank 0's result (raises with the ranks' stderr on failure)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(spec, out=os.path.join(tmp, "result.json"))
        path = os.path.join(tmp, "spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        start = time.time()
        ranks = run_ranks(world, ["-m", "benchmarks.dist_bench", "--worker", path], timeout=timeout)
        errs = [(r["rc"], r["err"]) for r in ranks]
        if any(rc != 0 for rc, _ in errs):
            tail = "\n".join(f"rank {i} rc={rc}: {err.strip()[-1500:]}" for i, (rc, err) in enumerate(errs))
            raise RuntimeError(f"world {world} failed:\n{tail}")
        with open(spec["out"]) as f:
            result = json.load(f)
        result["launch_s"] = time.time() - start
        return result


# -- worker -----------------------------------------------------------------------------------------------------------

def analytic_bytes(model, layout: dict, world: int, q: int = 1) -> dict:
    """Per-rank bytes per step from the model's parameter shapes (independent of the engine's accounting)."""
    layers = max((m for m in model.modules() if m.__class__.__name__ == "ModuleList"),
                 key=lambda m: sum(p.numel() for p in m.parameters()))
    tensors = [p for p in layers.parameters()]
    b = tensors[0].element_size()
    out = {"h2d_bytes": 0, "d2h_bytes": 0, "allgather_bytes": 0, "allreduce_bytes": (4 * q + 2) * 8 if world > 1 else 0}
    if layout.get("offload"):
        k = world if layout.get("stage") == 3 else 1
        shard = sum(math.ceil(p.numel() / k) * b for p in tensors)
        out.update(h2d_bytes=shard, d2h_bytes=shard, allgather_bytes=(k - 1) * shard)
        if k > 1:       # the partition group's agreement on its forwards (one float64 per rank of the group)
            out["allreduce_bytes"] += k * 8
    return out


def _calibrate_collectives(shard_numel: int, reps: int = 5) -> dict:
    """gloo all-gather bandwidth (bytes received per rank per second) and scalar all-reduce latency."""
    import torch
    import torch.distributed as dist
    world = dist.get_world_size()
    shard = torch.randn(shard_numel)
    out = torch.empty(world * shard_numel)
    small = torch.zeros(4, dtype=torch.float64)
    ag, ar = [], []
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        dist.all_gather_into_tensor(out, shard)
        ag.append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(small)
        ar.append((time.perf_counter() - t) / 10)
    return {"allgather_Bps": (world - 1) * shard_numel * 4 / statistics.median(ag),
            "allreduce_latency_s": statistics.median(ar)}


def _worker(spec_path: str) -> int:
    import torch
    import torch.distributed as dist

    import ds_zo
    from benchmarks.baselines import make_batch, zo_config
    from benchmarks.models import build

    torch.set_num_threads(1)
    with open(spec_path) as f:
        spec = json.load(f)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if spec.get("bind_cores"):       # one core per rank, as the deepspeed launcher's --bind_cores_to_rank does
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    b, seq = spec["rows"], spec["seq"]
    results = {"world": world, "cases": {}}
    runs = {}
    for name, layout, g_units in CASES[world]:
        if spec.get("cases") and name not in spec["cases"]:
            continue
        model = build(spec["shape"])
        analytic = analytic_bytes(model, layout, world)
        pertp = layout.get("pertp", 1)
        dp = world // pertp
        global_rows = g_units * b
        cfg = zo_config(global_rows // dp, perturbation_parallel=pertp)
        if layout.get("offload"):
            cfg["zero_optimization"] = {"stage": layout.get("stage", 0),
                                        "offload_param": {"device": "cpu", "pin_memory": False}}
        engine, *_ = ds_zo.initialize(model=model, config=cfg)
        batch = make_batch(model.config.vocab_size, global_rows, seq, seed=1)
        rows = global_rows // engine.dp_world_size
        mine = {k: v[engine.dp_rank * rows:(engine.dp_rank + 1) * rows] for k, v in batch.items()}
        for _ in range(2):                       # warm-up; afterwards the fused update is pending every step
            engine.train_batch(mine)
        runs[name] = (engine, mine)
        results["cases"][name] = {"walls": [], "cpus": [], "analytic": analytic, "rows_per_rank": rows,
                                  "global_rows": global_rows, "pertp": pertp, "dp": dp}
    before = {name: engine.comm_stats() for name, (engine, _) in runs.items()}
    for _ in range(spec["steps"]):               # cases interleaved step by step: the same machine noise for all
        for name, (engine, mine) in runs.items():
            engine.comm.barrier()
            w, c = time.perf_counter(), time.process_time()
            engine.train_batch(mine)
            results["cases"][name]["walls"].append(time.perf_counter() - w)
            results["cases"][name]["cpus"].append(time.process_time() - c)
    for name, (engine, _) in runs.items():
        after = engine.comm_stats()
        results["cases"][name]["bytes"] = {k: (after[k] - before[name][k]) / spec["steps"]
                                           for k in results["cases"][name]["analytic"]}
    del runs
    if spec.get("calibrate"):
        from benchmarks.calibrate import calibrate
        if world > 1:
            dist.barrier()      # every rank measures at once: the rates ranks get while sharing this host
        results["calibration"] = calibrate(spec["shape"], sorted({b, 2 * b}), seq, overhead=world == 1)
    if world > 1:
        model = build(spec["shape"])
        layer = max(sum(p.numel() for p in m.parameters()) for m in model.model.layers)
        results["collectives"] = _calibrate_collectives(math.ceil(layer / world))
    # every rank's timings reach rank 0 (a step takes as long as its slowest rank)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results["cases"])
        for name in results["cases"]:
            results["cases"][name]["walls_per_rank"] = [g[name]["walls"] for g in gathered]
            results["cases"][name]["cpus_per_rank"] = [g[name]["cpus"] for g in gathered]
    else:
        for name in results["cases"]:
            results["cases"][name]["walls_per_rank"] = [results["cases"][name]["walls"]]
            results["cases"][name]["cpus_per_rank"] = [results["cases"][name]["cpus"]]
    if rank == 0:
        with open(spec["out"], "w") as f:
            json.dump(results, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def step_times(case: dict) -> dict:
    """Per step, the slowest rank's wall time; per rank, the median CPU time."""
    walls = [max(ws) for ws in zip(*case["walls_per_rank"])]
    return {"wall": statistics.median(walls), "cpu": max(statistics.median(c) for c in case["cpus_per_rank"])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default="small")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--worlds", default="1,2,1,2")
    p.add_argument("--cases", default="", help="comma-separated subset of case names")
    p.add_argument("--bind-cores", action="store_true", help="pin each rank to one core (rank i to the i-th)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.worker:
        sys.exit(_worker(args.worker))
    spec = {"shape": args.shape, "rows": args.rows, "seq": args.seq, "steps": args.steps,
            "cases": [c for c in args.cases.split(",") if c], "bind_cores": args.bind_cores}
    runs = [run_world(int(w), spec) for w in args.worlds.split(",")]
    out = {"spec": spec, "runs": runs}
    for r in runs:
        print(f"world {r['world']} ({r['launch_s']:.0f} s):",
              {n: {k: round(v, 3) for k, v in step_times(c).items()} for n, c in r["cases"].items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
