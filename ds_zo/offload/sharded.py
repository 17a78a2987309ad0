"""DistZO2's hardware-aware reslicing on top of ZeRO-3 partitions.

Each rank's CPU master is its own ZeRO-3 shard of every offloaded parameter (`param.ds_tensor`), kept per unit in one
flat (pinned) buffer: the concatenation of the unit's shards, each padded to ceil(numel / k) as DeepSpeed pads it.
Per unit and pass: upload only the own shard (1/k of the unit) → apply the pending update to that shard on the device
(z drawn for exactly the shard's slice) → one coalesced all-gather within the partition group → reassemble the full
parameters (trimming each parameter's padding, which is never read) → compute → offload only the own, updated shard.
The all-gather runs on its own stream, ordered by events; on CPU with gloo it runs in issue order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..model.units import Unit
from .pipeline import OffloadPipeline


@dataclass
class ShardedUnit:
    unit: Unit
    flat: torch.Tensor            # CPU, storage dtype: this rank's shards of the unit's parameters, concatenated
    params: list[torch.nn.Parameter]
    shard_numels: list[int]       # c_i = ceil(n_i / k)
    full_numels: list[int]        # n_i
    shard_offsets: list[int]
    full_offsets: list[int]
    compute_dtype: torch.dtype
    rank: int                     # rank within the partition group

    @property
    def numel(self) -> int:       # elements of the assembled unit (what a compute buffer holds)
        return sum(self.full_numels)

    @property
    def shard_numel(self) -> int:
        return self.flat.numel()

    @property
    def nbytes(self) -> int:      # what crosses host <-> device per transfer: the own shard
        return self.flat.numel() * self.flat.element_size()

    def valid(self, i: int) -> int:
        """Elements of parameter i that this rank's shard really holds (the rest is padding)."""
        return max(0, min(self.shard_numels[i], self.full_numels[i] - self.rank * self.shard_numels[i]))

    def point_shards_at(self, flat: torch.Tensor) -> None:
        for p, o, c in zip(self.params, self.shard_offsets, self.shard_numels):
            p.ds_tensor.data = flat[o:o + c]

    def point_params_at(self, full: torch.Tensor) -> None:
        for p, o, n in zip(self.params, self.full_offsets, self.full_numels):
            p.data = full[o:o + n].view(p.ds_shape)

    def release_params(self) -> None:
        empty = torch.empty(0, dtype=self.compute_dtype)
        for p in self.params:
            p.data = empty


class ShardedStore:
    def __init__(self, units: list[Unit], partition_rank: int, partition_size: int,
                 storage_dtype: Optional[torch.dtype], pin: bool):
        self.units: dict[int, ShardedUnit] = {}
        for unit in units:
            params = list(dict.fromkeys(r.param for r in unit.params))
            missing = [r.name for r in unit.params if not hasattr(r.param, "ds_tensor")]
            if missing:
                raise ValueError(f"offload: unit '{unit.name}' has parameters that are not ZeRO-3 partitioned: "
                                 f"{missing[:3]}")
            dtypes = {p.ds_tensor.dtype for p in params}
            if len(dtypes) != 1:
                raise ValueError(f"offload: unit '{unit.name}' mixes parameter dtypes {sorted(map(str, dtypes))}")
            compute_dtype = dtypes.pop()
            shard_numels = [p.ds_tensor.numel() for p in params]
            full_numels = [p.ds_numel for p in params]
            for p, c, n in zip(params, shard_numels, full_numels):
                if c != -(-n // partition_size):
                    raise ValueError(f"offload: parameter of unit '{unit.name}' is partitioned over a group of another "
                                     f"size than zero_order.partition_group_size={partition_size}")
            shard_offsets = [sum(shard_numels[:i]) for i in range(len(params))]
            full_offsets = [sum(full_numels[:i]) for i in range(len(params))]
            flat = torch.empty(sum(shard_numels), dtype=storage_dtype or compute_dtype, pin_memory=pin)
            for p, o, c in zip(params, shard_offsets, shard_numels):
                flat[o:o + c].copy_(p.ds_tensor.data.reshape(-1))
            su = ShardedUnit(unit, flat, params, shard_numels, full_numels, shard_offsets, full_offsets,
                             compute_dtype, partition_rank)
            su.point_shards_at(flat)
            su.release_params()
            self.units[id(unit)] = su

    def __contains__(self, unit: Unit) -> bool:
        return id(unit) in self.units

    def __getitem__(self, unit: Unit) -> ShardedUnit:
        return self.units[id(unit)]

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.units.values())


class ShardedOffloadPipeline(OffloadPipeline):
    """OffloadPipeline whose units are resliced: shard up, all-gather across the partition group, shard down."""

    def __init__(self, store: ShardedStore, order: list[Unit], device: torch.device, communicator,
                 update_shard: Callable[[ShardedUnit, torch.Tensor], bool], prefetch_depth: int = 1,
                 overlap: bool = True):
        super().__init__(store, order, device, prefetch_depth, overlap)
        self.comm = communicator
        self.update_shard = update_shard      # applies the pending update to a device shard; returns whether it did
        k = communicator.dims.partition
        largest_shard = max((s.shard_numel for s in self.order), default=0)
        dtype = self.buffers[0].dtype if self.buffers else torch.float32
        n = len(self.buffers)
        self.shards = [torch.empty(largest_shard, dtype=dtype, device=self.device) for _ in range(n)]
        self.gathered = [torch.empty(k * largest_shard, dtype=dtype, device=self.device) for _ in range(n)]
        self.staging = [torch.empty(largest_shard, dtype=st.dtype, device=self.device) if st is not None else None
                        for st in self.staging]
        self.comm_stream = self.streams.side_stream()      # the all-gather's (its own on CUDA with overlap)
        self._dirty: dict[int, bool] = {}

    def nbytes_device(self) -> int:
        return super().nbytes_device() + sum(t.numel() * t.element_size() for t in self.shards + self.gathered)

    def _load(self, k: int, b: int):
        s, st = self.order[k], self.streams
        shard = self.shards[b][:s.shard_numel]
        with st.on(st.h2d):
            stage = self.staging[b][:s.shard_numel] if self.staging[b] is not None else None
            self._copy_in(shard, s.flat, stage)
            uploaded = st.event()
            uploaded.record(st.h2d)
        with st.on(self.comm_stream):
            self.comm_stream.wait_event(uploaded)
            self._dirty[k] = True      # until the update returns: one that fails part-way is written back as it is
            self._dirty[k] = self.update_shard(s, shard)   # the fused update, on the own shard only
            if self._dirty[k] and self._rounds:
                self._round(shard, stage)                   # rounded as stored, before every rank uses it
            if self._computing:
                gathered = self.gathered[b][:self.comm.dims.partition * s.shard_numel]
                self.comm.all_gather_shards(gathered, shard)
                rows = gathered.view(self.comm.dims.partition, s.shard_numel)
                full = self.buffers[b]
                for c, n, so, fo in zip(s.shard_numels, s.full_numels, s.shard_offsets, s.full_offsets):
                    full[fo:fo + n].copy_(rows[:, so:so + c].reshape(-1)[:n])   # trim the padding
            ready = st.event()
            ready.record(self.comm_stream)
        return ready

    def _failed_load_event(self):
        """After whatever a failed `_load` issued: its update and all-gather run on the all-gather stream, which
        waited for its upload."""
        event = self.streams.event()
        event.record(self.comm_stream)
        return event

    def round_to_storage(self, unit: Unit) -> None:
        """Nothing more to round: each rank rounds its own shard as it updates it (_load)."""

    def synchronize(self) -> None:
        super().synchronize()
        self.comm_stream.synchronize()      # shard updates and all-gathers read the uploaded shards, not the store

    def _point(self, k: int, b: int) -> None:
        if self._computing:
            self.order[k].point_params_at(self.buffers[b])

    def _store(self, k: int, b: int) -> None:
        s = self.order[k]
        stage = self.staging[b][:s.shard_numel] if self.staging[b] is not None else None
        self._copy_out(s.flat, self.shards[b][:s.shard_numel], stage)

    def _unpoint(self, k: int) -> None:
        self.order[k].release_params()

    def _written_back(self, k: int, dirty: bool) -> bool:
        return self._dirty.pop(k, False) or dirty
