"""Start-up of a multi-rank ZO run: identical replicas, or ZeRO-3 partitions over each partition group."""
from __future__ import annotations

import torch

from ..config import half_dtype
from ..weights_fingerprint import cast_parameters
from .communicator import Communicator


def is_partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


def replicate_from_rank0(model: torch.nn.Module, comm: Communicator) -> None:
    """ZO needs every rank to hold the same θ (each applies the same seeded update): broadcast rank 0's."""
    comm.broadcast_from_rank0([t.data for t in list(model.parameters()) + list(model.buffers())])


def partition_model(model: torch.nn.Module, comm: Communicator, ds_config: dict) -> None:
    """Partition a model over this rank's partition group with DeepSpeed's ZeRO-3 (zero.Init(module=...)), unless it
    already is (built under zero.Init / HfDeepSpeedConfig), in which case its partitioning must match."""
    import deepspeed

    k = comm.dims.partition
    cast = half_dtype(ds_config)
    if is_partitioned(model):
        sizes = {p.ds_process_group.size() if p.ds_process_group is not None else comm.dims.world
                 for p in model.parameters() if hasattr(p, "ds_tensor")}
        if sizes != {k}:
            raise ValueError(f"the model is already ZeRO-3 partitioned over groups of {sorted(sizes)} ranks, but "
                             f"zero_order.partition_group_size is {k}; build it under zero.Init with that group or "
                             "pass an unpartitioned model")
        # its shards are what the run trains: DeepSpeed does not cast them (it takes them to be in the config's
        # dtype), so a model partitioned in another dtype would train in that one while the run records the config's
        held = {p.ds_tensor.dtype for p in model.parameters()
                if hasattr(p, "ds_tensor") and p.ds_tensor.is_floating_point()}
        if cast is not None and held - {cast}:
            raise ValueError(f"the model is already ZeRO-3 partitioned in {sorted(map(str, held))}, but the config "
                             f"enables {cast} (bf16/fp16.enabled): build it under zero.Init with the same bf16/fp16 "
                             "config, or pass an unpartitioned model (ds_zo casts it before partitioning)")
        return
    replicate_from_rank0(model, comm)
    # DeepSpeed's engine takes ZeRO-3 parameters to be in the configured dtype already ("ZeRO-Init params are
    # already at the configured dtype") and casts only unpartitioned models, but zero.Init(module=...) partitions a
    # built model without casting it: cast it here, as the engine would (with bf16 enabled a run trained in fp32)
    if cast is not None:
        cast_parameters(model, cast)
    cfg = {"train_micro_batch_size_per_gpu": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}  # partition every parameter
    for key in ("bf16", "fp16"):
        if key in ds_config:
            cfg[key] = ds_config[key]
    with deepspeed.zero.Init(module=model, data_parallel_group=comm.dims.groups["partition"],
                             config_dict_or_path=cfg, remote_device="cpu", pin_memory=False):
        pass
