"""One rank of a multi-process test run: runs each case of a JSON spec (a layout of the same ZO fine-tune) and writes
its final parameters, losses, projected gradients and per-rank byte counts to the output folder.

    python tests/dist_worker.py SPEC.json          (under torchrun, deepspeed, mpirun, or ds_zo.parallel.local_ranks.run_ranks)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

import ds_zo  # noqa: E402
from models import batch, tiny_model  # noqa: E402

GLOBAL_ROWS = 4


def case_config(case: dict) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = world // case.get("pertp", 1)
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_ROWS // dp, "gradient_accumulation_steps": 1,
           "steps_per_print": 10**9,
           "optimizer": {"type": "ZOSGD", "params": {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.1}},
           "zero_order": {"seed": 5, "perturbation_parallel": case.get("pertp", 1),
                          "num_perturbations": case.get("q", 1),
                          "collective_timeout_s": case.get("timeout", 120)}}
    if case.get("offload") or case.get("stage", 0) == 3:
        cfg["zero_optimization"] = {"stage": case.get("stage", 0),
                                    "offload_param": {"device": "cpu", "pin_memory": False}}
    if case.get("partition"):
        cfg["zero_order"]["partition_group_size"] = case["partition"]
    if case.get("bf16"):
        cfg["bf16"] = {"enabled": True}
    for key, value in case.get("config_of_rank", {}).get(os.environ.get("RANK", "0"), {}).items():
        # this rank is started with other settings (a section's keys merged into it)
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def run_case(case: dict, out_dir: str) -> dict:
    fake = case.get("z_stream_of_rank", {}).get(os.environ.get("RANK", "0"))
    if fake:                 # this rank pretends its sampler is another GPU's (ds_zo.engine's own reference only)
        from ds_zo import engine as zo_engine
        zo_engine.z_stream = lambda device, counter_based=False: fake
    engine, *_ = ds_zo.initialize(model=tiny_model(case.get("arch", "llama"), case.get("tied", False)),
                                  config=case_config(case))
    rank = engine.global_rank
    rows = GLOBAL_ROWS // engine.dp_world_size
    shard = slice(engine.dp_rank * rows, (engine.dp_rank + 1) * rows)
    if "shard_of_rank" in case:                    # uneven (or empty) shards: [start, stop) of the global batch
        shard = slice(*case["shard_of_rank"][str(rank)])
    seed_shift = rank if case.get("batch_differs_by_rank") else 0    # a launch that feeds each rank other data
    losses, grads, faults = [], [], None
    for t in range(case.get("steps", 3)):
        if case.get("kill_rank") == rank and case.get("kill_at") == t:
            os.kill(os.getpid(), signal.SIGKILL)     # a rank dying mid-run
        if case.get("resume_at") == t:               # checkpoint, then go on in a new engine on a fresh model
            folder = os.path.join(out_dir, f"{case['name']}.checkpoints")
            engine.save_checkpoint(folder)
            engine.destroy()
            engine, *_ = ds_zo.initialize(model=tiny_model(case.get("arch", "llama"), case.get("tied", False)),
                                          config=case_config(case))
            engine.load_checkpoint(folder)
        if case.get("save_on_rank_only") == rank and t == 1:    # DeepSpeed's misuse: `if rank == 0: save`
            engine.save_checkpoint(os.path.join(out_dir, f"{case['name']}.checkpoints"))
        if case.get("checkpoint_faults_at") == t:
            faults = checkpoint_faults(engine, out_dir, case["name"])
        global_batch = batch(rows=GLOBAL_ROWS, seed=100 + t + 50 * seed_shift)
        losses.append(engine.train_batch({k: v[shard] for k, v in global_batch.items()}))
        grads.append(engine.last_projected_grad)
    stats = engine.comm_stats()
    if case.get("uneven_eval"):
        from ds_zo.evaluation import evaluate
        ids = batch(rows=5, seed=7)["input_ids"]   # 5 examples over the ranks: uneven shards
        examples = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
        result_eval = evaluate(engine, examples, batch_size=1, pad_id=0)
        assert result_eval["examples"] == 5
    eval_batch = batch(rows=GLOBAL_ROWS, seed=999)
    eval_loss = engine.eval_batch({k: v[shard] for k, v in eval_batch.items()})
    state = {k: v.detach().cpu().clone() for k, v in engine.module_state_dict().items()}
    result = {"losses": losses, "grads": grads, "stats": stats, "eval": eval_loss, "rank": rank,
              "world": engine.dims.world, "dp": engine.dp_world_size, "dp_rank": engine.dp_rank,
              "pertp": engine.dims.pertp, "partition": engine.dims.partition,
              "offloaded": [s.unit.name for s in engine.pipeline.order] if engine.pipeline else [],
              "store_bytes": engine.pipeline.store.nbytes() if engine.pipeline else 0,
              "base_weights": engine.base_weights, "samples": engine.global_samples, "faults": faults}
    if out_dir:
        name = f"{case['name']}.rank{rank}"
        torch.save(state, os.path.join(out_dir, name + ".pt"))
        with open(os.path.join(out_dir, name + ".json"), "w") as f:
            json.dump(result, f)
    engine.comm.barrier()
    return {"state": state, **result}


def checkpoint_faults(engine, out_dir: str, name: str) -> dict:
    """Checkpoint failures on rank 1 only: a save folder rank 1 does not share, then a load of a checkpoint whose rank 1
    file is corrupt. Each rank's error message, and whether the failed load left the model as it was."""
    from ds_zo.checkpoint import check_shared_folder
    rank, errors = engine.global_rank, {}
    try:
        engine.save_checkpoint(os.path.join(out_dir, f"{name}.unshared{rank}"))
    except Exception as e:
        errors["save"] = str(e)
    try:
        check_shared_folder(engine.comm, rank, os.path.join(out_dir, f"{name}.unshared{rank}"), "--output_dir")
    except Exception as e:
        errors["shared"] = str(e)
    check_shared_folder(engine.comm, rank, out_dir, "--output_dir")     # a shared one passes, leaving nothing
    shared = os.path.join(out_dir, f"{name}.shared")
    engine.save_checkpoint(shared, tag="t")
    engine.train_batch(batch(rows=GLOBAL_ROWS // engine.dp_world_size, seed=77))   # the model moves past it
    engine.flush()
    if rank == 1:
        with open(os.path.join(shared, "t", "zo_rank_00001.safetensors"), "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
    engine.comm.barrier()
    before = {k: v.clone() for k, v in engine.module_state_dict().items()}
    try:
        engine.load_checkpoint(shared, tag="t")
    except Exception as e:
        errors["load"] = str(e)
    after = engine.module_state_dict()
    return {"errors": errors, "unchanged": all(torch.equal(before[k], after[k]) for k in before)}


def main() -> int:
    from ds_zo.parallel.launch_env import ensure_launch_env
    ensure_launch_env()   # under mpirun, RANK/WORLD_SIZE come from MPI: needed before case_config reads them
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    args, _ = parser.parse_known_args()   # the deepspeed launcher adds --local_rank
    with open(args.spec) as f:
        spec = json.load(f)
    for case in spec["cases"]:
        run_case(case, spec["out"])
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a clear one-line reason for the test (and the user) on stderr, non-zero exit
        print(f"dist_worker rank {os.environ.get('RANK')}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
