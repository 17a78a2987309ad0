"""Soak: many ZO steps, resident memory sampled over time; a leak shows as growth after warm-up.

    python -m benchmarks.soak --steps 2000 --every 200 [--offload] [--out soak.json]
"""
from __future__ import annotations

import argparse
import json
import os

import psutil
import torch

import ds_zo
from benchmarks.models import build


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--offload", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    cfg = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**9,
           "optimizer": {"type": "ZOSGD", "params": {"lr": 1e-5, "eps": 1e-3}}, "zero_order": {"seed": 0}}
    if args.offload:
        cfg["zero_optimization"] = {"offload_param": {"device": "cpu"}}
    engine, *_ = ds_zo.initialize(model=build(args.shape), config=cfg)
    vocab = engine.module.config.vocab_size
    proc = psutil.Process(os.getpid())
    samples = []
    g = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, vocab, (4, 32), generator=g)
        engine.train_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        if step % args.every == 0 or step == 1:
            if step % (args.every * 4) == 0:
                engine.module_state_dict()          # exercise the flush path too
            samples.append((step, proc.memory_info().rss / 2**20))
            print(f"step {step:6d}  rss {samples[-1][1]:8.1f} MiB", flush=True)
    after_warmup = [m for s, m in samples if s >= args.every]
    result = {"shape": args.shape, "offload": args.offload, "steps": args.steps, "rss_mib": samples,
              "growth_after_warmup_mib": after_warmup[-1] - after_warmup[0] if len(after_warmup) > 1 else 0.0}
    print(f"RSS growth after warm-up: {result['growth_after_warmup_mib']:+.1f} MiB over "
          f"{args.steps - args.every} steps")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
