"""Which units an engine offloads, and the pipeline that streams them: ZO2's (a CPU store of whole units) or DistZO2's
resliced one (each rank's ZeRO-3 shards, all-gathered per pass). Everything not offloaded goes to the device."""
from __future__ import annotations

from collections import Counter
from fnmatch import fnmatchcase
from typing import Callable, Optional

import torch
from deepspeed.utils import logger

from ..config import ConfigError, OffloadConfig, ZeroOrderConfig
from ..model.units import Unit
from .pipeline import OffloadPipeline
from .sharded import ShardedOffloadPipeline, ShardedStore
from .store import ParameterStore

STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def offloaded_units(units: list[Unit], resident_units: Optional[list[str]]) -> list[Unit]:
    """The units to offload: the decoder layers, or every unit zero_order.resident_units does not name. A unit
    holding a weight tied to another unit stays resident (the store would hold a second master of it)."""
    if resident_units is None:
        offloaded = [u for u in units if u.is_layer]
    else:
        unmatched = [pat for pat in resident_units if not any(fnmatchcase(u.name, pat) for u in units)]
        if unmatched:       # a typo would offload the units it meant to keep, the tied embedding among them
            raise ConfigError(f"zero_order.resident_units: {unmatched} match no unit; units are named "
                              f"{[u.name for u in units][:4]}... (fnmatch patterns on these names)")
        offloaded = [u for u in units if not any(fnmatchcase(u.name, pat) for pat in resident_units)]
    uses = Counter(id(r.param) for u in units for r in u.params)
    shared = {i for i, n in uses.items() if n > 1}
    for u in offloaded:
        if any(id(r.param) in shared for r in u.params):
            raise ConfigError(f"offload: unit '{u.name}' holds a weight tied to another unit; keep it resident "
                              "(zero_order.resident_units)")
    if not offloaded and resident_units is None:
        raise ConfigError("offload: no unit is offloaded: by default the decoder layers are, and this model has "
                          "none as units (its largest nn.ModuleList is inside a frozen module, which is one "
                          "resident unit); name the units to keep resident in zero_order.resident_units, the "
                          f"rest are offloaded (units: {[u.name for u in units][:6]})")
    if not offloaded:
        raise ConfigError("offload: no unit is offloaded (zero_order.resident_units matches every unit)")
    return offloaded


def build_pipeline(module: torch.nn.Module, units: list[Unit], offload: OffloadConfig, zo: ZeroOrderConfig,
                   device: torch.device, dims, comm, update_shard: Callable) -> OffloadPipeline:
    """Store the offloaded units on the host, move everything else (resident units' parameters, every buffer) to
    `device`, and return the pipeline over the offloaded units. `update_shard` applies the pending update to a
    resliced unit's device shard (the engine's)."""
    offloaded = offloaded_units(units, zo.resident_units)
    pin = offload.pin_memory and device.type == "cuda"
    if device.type == "cuda" and not offload.pin_memory:
        logger.warning("ds_zo: zero_optimization.offload_param.pin_memory is false: copies between pageable host "
                       "memory and the GPU block the host, so uploads, compute and write-backs do not overlap "
                       "(every transfer waits for its stream). Set it to true (the default) unless pinned "
                       "memory is scarce")
    storage = STORAGE_DTYPES[zo.offload_dtype] if zo.offload_dtype else None
    if offload.partitioned:
        materialize_resident([u for u in units if u not in offloaded], device, dims, comm)
        store = ShardedStore(offloaded, dims.partition_rank, dims.partition, storage, pin)
    else:
        store = ParameterStore(offloaded, storage, pin)
    stored = {id(p) for s in store.units.values() for p in s.params}
    for p in module.parameters():
        if id(p) not in stored:
            p.data = p.data.to(device)
    for mod in module.modules():
        for name, buf in mod._buffers.items():
            if buf is not None:
                mod._buffers[name] = buf.to(device)
    if offload.partitioned:
        return ShardedOffloadPipeline(store, offloaded, device, comm, update_shard, zo.prefetch_depth, zo.overlap)
    return OffloadPipeline(store, offloaded, device, zo.prefetch_depth, zo.overlap)


def materialize_resident(units: list[Unit], device: torch.device, dims, comm) -> None:
    """ZeRO-3: resident units (embeddings, norm, head by default) are gathered once, whole, onto every rank's device
    and stay there; that replica is their master (every rank applies the same update to it) and the CPU shard is
    released."""
    for u in units:
        for r in u.params:
            p = r.param
            if not hasattr(p, "ds_tensor") or p.ds_tensor.numel() == 0:
                continue
            shard = p.ds_tensor.data.to(device)
            gathered = torch.empty(dims.partition * shard.numel(), dtype=shard.dtype, device=device)
            comm.all_gather_shards(gathered, shard, what="start-up gather of the resident units")
            p.data = gathered[:p.ds_numel].view(p.ds_shape).clone()
            p.ds_tensor.data = torch.empty(0, dtype=shard.dtype)
    comm.stats["allgather_bytes"] = 0  # start-up traffic is not per-step traffic
