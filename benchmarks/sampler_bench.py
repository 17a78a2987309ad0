"""ds_zo's native z code on CPU — the vectorised sampler (ds_zo/native/mt19937_normal.h) and the fused element-wise
passes (ds_zo/native/z_passes.h) — against torch's normal_ and torch's element-wise ops, side by side in one process.

- draws: ns per value of one 2^20-element z chunk, interleaved: torch's normal_ (a seeded generator, as ds_zo's
  Python path draws), the native sampler with ATen's normal_ inside (the vectorised one turned off), the vectorised
  one;
- steps: one ds_zo engine stepped in turn with ATen's sampler, with the vectorised sampler (z chunks drawn into
  scratch, then torch's element-wise ops), and with the fused passes (z drawn a tile at a time inside one sweep),
  MeZO's loop beside it, same model, batch and process (the SmolLM2-135M shape). The values are the same every way
  (tests pin it), so the three ds_zo runs do the same arithmetic; only how fast differs.

    python -m benchmarks.sampler_bench [--shape smollm2-135m] [--rows 4,16] [--threads 1] [--reps 3] [--out F.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from benchmarks.run import _time, fmt, summary
from ds_zo import native
from ds_zo.perturb import CHUNK_ELEMENTS


def draws(reps: int) -> dict:
    kernels = native.chunk_draws()
    if kernels is None or not kernels.fast_gaussian():
        raise SystemExit(f"the vectorised sampler is not in use here: {native.unavailable() or native.fast_gaussian_off()}")
    chunk = torch.empty(CHUNK_ELEMENTS)

    def torch_normal():
        chunk.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(12345))

    def native_draw(fast: bool):
        kernels.set_fast_gaussian(fast)
        kernels.draw_chunks([chunk], [12345], 1.0, True)

    sides = {"torch normal_": torch_normal, "native, ATen sampler": lambda: native_draw(False),
             "native, vectorised": lambda: native_draw(True)}
    times = {k: [] for k in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            t = time.perf_counter()
            for _ in range(10):
                fn()
            times[name].append((time.perf_counter() - t) / 10 / CHUNK_ELEMENTS * 1e9)
    kernels.set_fast_gaussian(True)
    return {k: summary(v) for k, v in times.items()}


def steps(shape: str, rows: int, seq: int, reps: int) -> dict:
    import ds_zo
    from benchmarks.baselines import MeZOLoop, make_batch, zo_config
    from benchmarks.models import build
    kernels = native.chunk_draws()
    base = build(shape)
    batch = make_batch(base.config.vocab_size, rows, seq)
    engine, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=zo_config(rows))
    mezo = MeZOLoop(copy.deepcopy(base))
    del base

    def dszo(fast: bool, fused: bool):
        def step(b):
            kernels.set_fast_gaussian(fast)
            engine.perturbations.fused_passes = fused
            engine.train_batch(b)
        return step
    sides = {"dszo, ATen sampler": dszo(False, False), "dszo, vectorised": dszo(True, False),
             "dszo, fused passes": dszo(True, True), "mezo": mezo.step}
    for fn in sides.values():
        fn(batch)
    engine.train_batch(batch)
    walls = {k: [] for k in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            walls[name].append(_time(fn, batch)[0])
    kernels.set_fast_gaussian(True)
    engine.perturbations.fused_passes = True
    out = {"rows": rows, "seq": seq, "wall": {k: summary(v) for k, v in walls.items()}}
    for name in ("dszo, ATen sampler", "dszo, vectorised", "dszo, fused passes"):
        out[f"{name} / mezo"] = summary([a / b for a, b in zip(walls[name], walls["mezo"])])

    def ratio(a: str, b: str) -> dict:
        return summary([x / y for x, y in zip(walls[f"dszo, {a}"], walls[f"dszo, {b}"])])
    out["vectorised / ATen"] = ratio("vectorised", "ATen sampler")
    out["fused / vectorised"] = ratio("fused passes", "vectorised")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--rows", default="4,16")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "shape": args.shape, "draws_ns_per_value": draws(max(5, args.reps)),
              "steps": [steps(args.shape, int(r), args.seq, args.reps) for r in args.rows.split(",")]}
    for name, s in result["draws_ns_per_value"].items():
        print(f"draw one chunk, {name:<22} {fmt(s, 2)} ns/value")
    for s in result["steps"]:
        for name, v in s.items():
            if isinstance(v, dict) and "median" in v:
                print(f"{s['rows']}x{s['seq']}, {args.threads} thread(s): {name:<28} {fmt(v)}")
            elif name == "wall":
                for k, w in v.items():
                    print(f"{s['rows']}x{s['seq']}, {args.threads} thread(s): step {k:<23} {fmt(w)} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
