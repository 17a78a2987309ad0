"""Replay a fine-tune from its step log (DESIGN.md invariant 6).

The records [(step, seed, g, lr, wd)] plus the list of trainable parameter names fully determine the run: applying
each record's update to the base weights, in order, reproduces the fine-tuned parameters on the same device type.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Iterable, Optional

import torch

from .model.units import is_decayed, resolve_trainable
from .optimizer import StepRecord, apply_step
from .perturb import PerturbationGenerator, param_key, parse_z_stream, z_stream


def read_step_log(path: str) -> list[StepRecord]:
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(StepRecord.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: malformed step record ({e})") from None
    return records


def write_step_log(path: str, records: Iterable[StepRecord]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")


def _round_through(p: torch.Tensor, dtype: Optional[torch.dtype]) -> None:
    if dtype is not None and dtype != p.dtype:
        p.copy_(p.to(dtype))      # (through a wider dtype: exactly the same values)


@torch.no_grad()
def replay(model: torch.nn.Module, records: Iterable[StepRecord], trainable: Optional[Iterable[str]] = None,
           distribution: str = "gaussian", rows: Optional[dict[str, torch.Tensor]] = None,
           stored: Optional[dict[str, torch.dtype]] = None, sampler: str = "auto") -> torch.nn.Module:
    """Apply the recorded steps to `model` (the base weights) in place and return it. `trainable` holds the canonical
    parameter names that were trained (default: every parameter with requires_grad); `rows` the row subsets;
    `stored` the dtype of the store the run kept a parameter in (zero_order.offload_dtype): as in the run, the
    parameter computes in its own dtype and its values are rounded to the stored dtype at the start and after
    every update. `sampler`: the run's z sampler (zero_order.z_sampler; "auto", the default, picks as the engine
    does on the model's device: counter-based on CUDA where Triton runs, chunked elsewhere; a checkpoint's is
    perturb.parse_z_stream of its z_stream)."""
    rows = rows or {}
    stored = stored or {}
    names = set(trainable) if trainable is not None else resolve_trainable(model, [])
    generator = PerturbationGenerator(distribution, sampler=sampler)
    params = [(n, p) for n, p in model.named_parameters() if n in names]
    unknown = names - {n for n, _ in params}
    if unknown:
        raise ValueError(f"replay: trainable names {sorted(unknown)[:5]} are not parameters of this model")
    for n, p in model.named_parameters():
        _round_through(p.data, stored.get(n))
    previous = None
    for rec in records:
        if previous is not None and rec.step <= previous:   # gaps are skipped (non-finite) steps
            raise ValueError(f"replay: step log goes from step {previous} back to {rec.step}")
        previous = rec.step
        for n, p in params:
            if n in rows:
                target = p.data[rows[n]]
                apply_step(target, param_key(n), rec, is_decayed(p), generator)
                p.data[rows[n]] = target
            else:
                apply_step(p.data, param_key(n), rec, is_decayed(p), generator)
            _round_through(p.data, stored.get(n))
    return model


def main(argv=None) -> None:
    """python -m ds_zo.replay --checkpoint OUT/checkpoints [--tag T] --model smollm2 --output DIR

    Rebuilds the fine-tuned weights from the base model and the checkpoint's step log alone (its tensors are not
    read), and saves them with save_pretrained (safetensors)."""
    import argparse

    from .checkpoint import read_state, read_steps
    from .models import load_model_and_tokenizer
    from .weights_fingerprint import cast_parameters, describe, differing, weight_fingerprint

    p = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (with 'latest') or one tag's folder")
    p.add_argument("--tag", default=None)
    p.add_argument("--model", default="smollm2", help="the base model the run started from (as for ds_zo.train)")
    p.add_argument("--output", required=True)
    p.add_argument("--device", default=None,
                   help="where to replay (default: the device type the run drew z on, e.g. cuda for a GPU run): z "
                        "depends on the sampler, so the replay must draw it where the run did")
    args = p.parse_args(argv)
    ckpt = os.path.abspath(args.checkpoint)
    if args.tag is None and not os.path.isfile(os.path.join(ckpt, "latest")):
        if not os.path.isfile(os.path.join(ckpt, "zo_state.json")):
            inner = os.path.join(ckpt, "checkpoints")       # ds_zo.train's --output_dir was given
            hint = f"; ds_zo.train writes its checkpoints to {inner}" if os.path.isdir(inner) else ""
            p.error(f"--checkpoint {args.checkpoint!r} is neither a checkpoint folder (with a 'latest' file) nor one "
                    f"tag's folder (with zo_state.json){hint}")
        ckpt, args.tag = os.path.dirname(ckpt), os.path.basename(ckpt)   # a tag folder was given
    folder, state = read_state(ckpt, args.tag)
    model, tokenizer = load_model_and_tokenizer(args.model)
    names = [n for n, _, _ in state["model"]]
    if [n for n, _ in model.named_parameters()] != names:
        raise SystemExit(f"replay: {args.model!r} is not the model this run started from (parameter names differ)")
    # bf16 / fp16 enabled: DeepSpeed cast the run's parameters, and its steps were applied in that dtype
    if state.get("half_dtype"):
        if not any(d == state["half_dtype"] for _, _, d in state["model"]):
            raise SystemExit(f"replay: the checkpoint records {state['half_dtype']} but none of its parameters in it: "
                             "a ZeRO-3 run before ds_zo cast partitioned models trained in fp32 despite bf16/fp16 "
                             "enabled, and its steps cannot be replayed exactly")
        cast_parameters(model, getattr(torch, state["half_dtype"].removeprefix("torch.")))
    saved_base = state.get("base_weights") or {}     # checkpoints before the twelfth session have none
    other = differing(saved_base, weight_fingerprint(model), names)
    if other:
        raise SystemExit(f"replay: {args.model!r} is not the model this run started from: {describe(other)} hold "
                         "other weights")
    rows = {n: torch.tensor(r, dtype=torch.long) for n, r in state["trainable_rows"].items()}
    records = read_steps(folder)
    recorded = state.get("z_stream", "cpu")           # checkpoints before the field were CPU runs or unmarked
    if recorded.startswith("mixed("):
        raise SystemExit(f"replay: the run was resumed on another sampler, its step log mixes two z streams "
                         f"{recorded[5:]}: no single device can replay it")
    kind, sampler = parse_z_stream(recorded)
    device = torch.device(args.device or kind)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"replay: the run drew z on {recorded}; this machine has no CUDA device (z on another "
                         "device is another sequence, so a replay here would not rebuild the run)")
    try:
        here = z_stream(device, PerturbationGenerator(state["distribution"], sampler=sampler).counter_based(device))
    except ValueError as err:       # the counter-based sampler cannot run here
        raise SystemExit(f"replay: the run drew z on {recorded}: {err}") from None
    if here != recorded:
        raise SystemExit(f"replay: the run drew z on {recorded}, this replay would draw it on {here}: a "
                         "different sampler gives different z; replay on the same device type (and GPU model)")
    # parameters the run kept in an offload store of another dtype (zero_order.offload_dtype) had their values rounded
    # to it after every update (checkpoints before `stored_dtypes`: the parameters' recorded dtypes, which show the
    # store's where the parameters are its views, and only the parameters' own dtype otherwise)
    stored_names = state["stored_dtypes"] if "stored_dtypes" in state else {n: d for n, _, d in state["model"]}
    if "stored_dtypes" not in state and state["layout"].get("resliced"):
        print("replay: warning: this ZeRO-3 offload checkpoint predates `stored_dtypes`; if the run used "
              "zero_order.offload_dtype, its offloaded layers will not be rebuilt exactly", file=sys.stderr)
    stored = {n: getattr(torch, d.removeprefix("torch.")) for n, d in stored_names.items()}
    model.to(device)
    replay(model, records, state["trainable"], state["distribution"],
           {n: r.to(device) for n, r in rows.items()}, stored, sampler)
    model.to("cpu")
    model.save_pretrained(args.output, safe_serialization=True)
    tokenizer.save_pretrained(args.output)
    print(f"replayed {len(records)} steps from {folder} onto {args.model}; saved to {args.output}")


if __name__ == "__main__":
    main()
