"""ds_zo's own host time on the GPU build's ZO path, measured without a GPU.

    python -m benchmarks.host_path [--layers 24] [--steps 5] [--reps 5] [--out FILE]

Since the fused kernels (ds_zo/triton_passes.py) a GPU step of OPT-1.3B is bound by the host: Python issuing a unit's
passes and its HF forward. This runs the path GPUs run — counter-based z, θ ± εz and the update as fused Triton
launches — on CPU, with the launches stood in for (the stand-in zeroes what a z fill would write and nothing else),
on an OPT-shaped model of many narrow layers, so that a step is nearly all host time. Two arms, interleaved, on
engines with the same weights:
- `kept`: the default, each unit's launch layouts kept per address (PerturbedCopies._copies_fused,
  ZOSGD._apply_fused: a step pays the keys);
- `general`: those two answering None, so every unit takes the general path (pieces cut, checked and laid out at
  every step), as before the layouts were kept.
It also times HF's own forward of the model, for scale (ds_zo runs each layer once per slot). Kernels are not run,
so the values are not trained ones: the copies stay zero and the losses finite; what is timed is the host's work.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")      # Triton on CPU (compiled kernels are never run here)
os.environ.setdefault("DS_ACCELERATOR", "cpu")      # (on a GPU machine too: this measures the host's path on CPU)

import torch  # noqa: E402


@contextlib.contextmanager
def kernels_stood_in():
    """Triton launches replaced for the duration (restored after): a z fill's output is zeroed, nothing else runs."""
    from ds_zo import triton_z
    real = triton_z.launch

    def stand_in(kernel, grid, device, args, kwargs):
        if kernel is triton_z._fill:
            args[0].zero_()
    triton_z.launch = stand_in
    try:
        yield
    finally:
        triton_z.launch = real


def _zeroed_buffers(engine) -> None:
    """The engine's copy buffers allocated as zeros (its own instance only): never written with the kernels stood
    in, so a forward stays finite."""
    buffers = engine.copies.buffers
    get = buffers.get

    def zeroed(role, numel, dtype, device):
        k = (role, device, dtype)
        before = buffers._bufs.get(k)
        out = get(role, numel, dtype, device)
        if buffers._bufs.get(k) is not before:
            buffers._bufs[k].zero_()
        return out
    buffers.get = zeroed


def model(layers: int, hidden: int = 64, seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=256, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=4, word_embed_proj_dim=hidden, max_position_embeddings=512, enable_bias=True)
    return OPTForCausalLM(cfg).eval()


def engine(base, general: bool, offload: bool):
    import ds_zo
    cfg = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
           "optimizer": {"type": "ZOSGD", "params": {"lr": 1e-6, "eps": 1e-3}},
           "zero_order": {"seed": 0, "z_sampler": "philox", "max_consecutive_skips": 10**6}}
    if offload:
        cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu", "pin_memory": False}}
    eng, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=cfg)
    _zeroed_buffers(eng)
    if general:         # this engine's own methods only
        eng.copies._copies_fused = lambda refs: None
        eng.optimizer._apply_fused = lambda params: None
    return eng


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24, help="decoder layers (OPT-1.3B has 24)")
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ds_zo import triton_z
    if not triton_z.INTERPRETED:
        raise SystemExit("benchmarks.host_path runs on CPU with Triton's interpreter: start it with TRITON_INTERPRET "
                         "unset or 1, not 0")
    base = model(args.layers)
    ids = torch.randint(0, 256, (1, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    arms = {f"{name}{'_offload' if off else ''}": (name == "general", off)
            for off in (False, True) for name in ("kept", "general")}
    engines = {name: engine(base, *spec) for name, spec in arms.items()}     # (self-checks run for real here)
    units = len(engines["kept"].units)
    times: dict[str, list[float]] = {name: [] for name in [*arms, "hf_forward"]}
    with kernels_stood_in():
        for eng in engines.values():
            eng.train_batch(batch)           # layouts, buffers, first-call costs
        order = list(times)
        for r in range(args.reps):
            for name in order[r % len(order):] + order[:r % len(order)]:   # each repetition starts one arm later
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    if name == "hf_forward":
                        with torch.no_grad():
                            base(**batch)
                    else:
                        engines[name].train_batch(batch)
                times[name].append((time.perf_counter() - t0) / args.steps)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    command = " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": f"python -m benchmarks.host_path {command}".strip(), "layers": args.layers,
              "units": units, "seq": args.seq, "steps": args.steps, "reps": args.reps, "threads": args.threads,
              "step_s": {name: {"median": med[name], "min": min(ts), "max": max(ts)} for name, ts in times.items()},
              "kept_over_general": {off: med[f"kept{off}"] / med[f"general{off}"] for off in ("", "_offload")},
              # per repetition (the arms of one repetition run back to back): less moved by the host's drift
              "kept_over_general_paired": {off: statistics.median(k / g for k, g in zip(times[f"kept{off}"],
                                                                                        times[f"general{off}"]))
                                           for off in ("", "_offload")},
              "saved_per_unit_s": {off: (med[f"general{off}"] - med[f"kept{off}"]) / units
                                   for off in ("", "_offload")}}
    print(f"{args.layers} layers ({units} units), 1 x {args.seq} tokens, kernels stood in; median of {args.reps} "
          f"x {args.steps} steps")
    for name, ts in times.items():
        print(f"  {name:16s} {med[name] * 1e3:8.2f} ms  [{min(ts) * 1e3:.2f}, {max(ts) * 1e3:.2f}]")
    for off in ("", "_offload"):
        print(f"  kept / general{off}: {result['kept_over_general'][off]:.3f} (paired per repetition "
              f"{result['kept_over_general_paired'][off]:.3f}), "
              f"{result['saved_per_unit_s'][off] * 1e6:.0f} µs saved per unit")
    if args.out:
        from benchmarks.offload_bench import write_json
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
