"""The ZO2 offload pipeline: stream offloaded units through a small pool of device buffers, one pass per forward.

Per unit k, in execution order:  upload (h2d stream) → [compute stream] wait for the upload, apply the pending update,
perturb, compute every slot → offload the updated unit (d2h stream, only if the update changed it) → the buffer is
reused for unit k + depth + 2. Uploads run `prefetch_depth` units ahead, so upload of k+1.., compute of k and offload of
k−1 overlap; at most depth + 2 units are resident. All ordering is by CUDA events between streams, never by host
synchronisation; on CPU the same code runs with no-op streams (synchronously, in issue order), so CI covers the logic.
Each offloaded unit crosses host→device once and device→host at most once per pass.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..model.perturbed_copies import Residency
from ..model.units import Unit
from .store import ParameterStore
from .streams import Streams


class OffloadPipeline(Residency):
    def __init__(self, store: ParameterStore, order: list[Unit], device: torch.device, prefetch_depth: int = 1,
                 overlap: bool = True):
        if prefetch_depth < 1:
            raise ValueError(f"zero_order.prefetch_depth: {prefetch_depth} must be >= 1")
        self.store = store
        self.order = [store[u] for u in order]
        self.index = {id(s.unit): k for k, s in enumerate(self.order)}
        self.device = torch.device(device)
        self.depth = prefetch_depth
        self.streams = Streams(self.device, overlap)
        dtypes = {s.compute_dtype for s in self.order}
        if len(dtypes) > 1:
            raise ValueError(f"offload: offloaded units compute in several dtypes {sorted(map(str, dtypes))}")
        n_buffers = min(prefetch_depth + 2, len(self.order))
        largest = max((s.numel for s in self.order), default=0)
        compute_dtype = dtypes.pop() if dtypes else torch.float32
        self.buffers = [torch.empty(largest, dtype=compute_dtype, device=self.device) for _ in range(n_buffers)]
        # device-side buffers in the storage dtype, when units are stored in another dtype than they compute in
        converts = any(self._converts(s) for s in self.order)
        storage_dtype = self.order[0].flat.dtype if self.order else compute_dtype
        self.staging = [torch.empty(largest, dtype=storage_dtype, device=self.device) if converts else None
                        for _ in range(n_buffers)]
        # an update must be rounded as stored unless the storage dtype holds every compute value (fp32 for bf16)
        self._rounds = converts and torch.finfo(storage_dtype).bits <= torch.finfo(compute_dtype).bits
        self._free = [None] * n_buffers          # event after which buffer b may be overwritten
        self._occupant: list[Optional[int]] = [None] * n_buffers
        self._store_ready: dict[int, object] = {}  # unit k -> event of its last offload (the store is being written)
        self._uploaded: dict[int, object] = {}     # unit k -> event of its upload in this pass
        self._pass: list[int] = []                 # the units of the current pass, in visiting order
        self._pos: dict[int, int] = {}
        self._base = self._cursor = 0              # buffer of the pass's first unit; where the next pass starts
        self._computing = True
        self.stats = {"h2d_bytes": 0, "d2h_bytes": 0, "uploads": 0, "offloads": 0, "order_misses": 0, "retired": 0}
        # benchmarks only: time each upload (CUDA: timing events around the copy on the h2d stream; CPU: the
        # synchronous copy's wall time) and the compute stream's wait for it (timing events around the wait: how long
        # compute stalled); off by default, since timing events cost a little on every unit visit
        self.time_transfers = False
        self._transfer_times: list[tuple[object, object, int]] = []
        self._stall_times: list[tuple[object, object]] = []
        self.trace: Optional[list[tuple[str, str]]] = None   # set to [] to record the issue order of operations
        self._view_cache: dict[tuple[int, Optional[int]], list[torch.Tensor]] = {}
        self._events: dict[tuple[str, int], object] = {}

    @staticmethod
    def _converts(stored) -> bool:
        return stored.flat.dtype != stored.compute_dtype

    def _log(self, op: str, k: int) -> None:
        if self.trace is not None:
            self.trace.append((op, self.order[k].unit.name))

    def nbytes_device(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers + [s for s in self.staging if s is not None])

    # -- one pass ---------------------------------------------------------------------------------------------------
    def begin(self, units: Optional[list[Unit]] = None, compute: bool = True) -> None:
        """Start a pass over `units` (default: every offloaded unit, in execution order) and issue its first
        depth + 1 uploads. Buffers are assigned round-robin by position in the pass. compute=False: a pass that only
        updates the stored units (flush), with nothing to assemble for a forward."""
        ks = list(range(len(self.order))) if units is None else [self.index[id(u)] for u in units]
        self.streams.check_compute_stream()
        self.retire_leftovers()
        self._pass = ks
        # round-robin continues across passes: the first upload of this pass goes to the buffer freed longest ago,
        # not to the one the previous pass's last unit may still be offloading from
        self._base = self._cursor
        self._cursor = (self._cursor + len(ks)) % max(1, len(self.buffers))
        self._pos = {k: i for i, k in enumerate(ks)}
        self._uploaded = {}
        self._occupant = [None] * len(self.buffers)
        self._computing = compute
        for i in range(min(self.depth + 1, len(ks))):
            self._upload(ks[i])

    def _buffer_of(self, k: int) -> int:
        return (self._base + self._pos.get(k, k)) % len(self.buffers)

    def _upload(self, k: int) -> None:
        b = self._buffer_of(k)
        prev = self._occupant[b]
        if prev is not None and prev != k:
            self._retire(prev, b)                # it was prefetched but never computed: upload it again if needed
        st = self.streams
        if self._free[b] is not None:
            st.h2d.wait_event(self._free[b])      # the buffer's previous unit is done with it
        if k in self._store_ready:
            st.h2d.wait_event(self._store_ready[k])  # this unit's last offload has landed in the store
        try:
            self._uploaded[k] = self._load(k, b)
        except BaseException:
            # a load that failed part-way may have changed the unit (a resliced shard takes its pending update as it
            # loads: out of memory there, a dead peer in its all-gather): it holds b until retired, which writes it
            # back if it changed
            self._uploaded[k] = self._failed_load_event()
            self._occupant[b] = k
            raise
        self._occupant[b] = k
        self.stats["uploads"] += 1
        self._log("upload", k)

    def _event(self, role: str, k: int):
        """Unit k's event for `role` (loaded: on the h2d stream, computed: compute, landed: d2h), made once and
        recorded again at each visit: three new events per visit are host time on a host-bound step. Recording an
        event again is safe because each role is only ever recorded on its one stream: a wait issued before keeps
        the recording it saw, and one issued after sees a later point of the same in-order stream, so it can only
        wait longer, never less. (An override recording elsewhere, like the sharded `_load` on its all-gather
        stream, makes its own events.)"""
        event = self._events.get((role, k))
        if event is None:
            event = self._events[(role, k)] = self.streams.event()
        return event

    def _failed_load_event(self):
        """An event after whatever a failed `_load` issued (its copy, on the upload stream)."""
        event = self.streams.event()
        event.record(self.streams.h2d)
        return event

    def retire_leftovers(self) -> None:
        """Retire the units the last pass uploaded but never computed (it ended early: an exception in the
        forward). Called when the next pass begins and by the engine's flush, before anything reads the store.
        A write-back issued here returns to the compute stream (Streams.on), so, as for a pass, that must be the
        current one."""
        if any(k is not None for k in self._occupant):
            self.streams.check_compute_stream()
        for b, k in enumerate(self._occupant):
            if k is not None:
                self._retire(k, b)

    def _retire(self, k: int, b: int) -> None:
        """Unit k was uploaded into buffer b but never computed (a unit ran out of order and took b, or a pass ended
        early: an exception in the forward). Buffer b is free once k's load has finished; a load that changed the
        unit (a resliced shard takes its pending update as it is loaded) is written back first, or that update would
        be lost: the optimizer counts it as applied."""
        loaded = self._uploaded.pop(k, None)
        self._occupant[b] = None
        if loaded is None:
            return
        self._release(k, b, loaded, self._written_back(k, False))
        self.stats["retired"] += 1

    def _release(self, k: int, b: int, after, changed: bool) -> None:
        """Buffer b, which holds unit k, is free once the event `after` has passed; if k changed there, it is first
        written back to the store (on the d2h stream, after that event), and b is free once that has landed."""
        if not changed:
            self._free[b] = after
            return
        st = self.streams
        st.d2h.wait_event(after)
        with st.on(st.d2h):
            self._store(k, b)
        landed = self._event("landed", k)
        landed.record(st.d2h)
        self._free[b] = landed
        self._store_ready[k] = landed
        self.stats["offloads"] += 1
        self._log("offload", k)

    def _copy_in(self, dst: torch.Tensor, src: torch.Tensor, stage: Optional[torch.Tensor]) -> None:
        """Host → device (on the current stream), converting from the storage dtype on the device if needed."""
        if stage is not None and src.dtype != dst.dtype:
            stage.copy_(src, non_blocking=True)
            dst.copy_(stage)
        else:
            dst.copy_(src, non_blocking=True)
        self.stats["h2d_bytes"] += src.numel() * src.element_size()

    def _copy_out(self, dst: torch.Tensor, src: torch.Tensor, stage: Optional[torch.Tensor]) -> None:
        """Device → host (on the current stream); an update rounds once into the storage dtype."""
        if stage is not None and src.dtype != dst.dtype:
            stage.copy_(src)
            dst.copy_(stage, non_blocking=True)
        else:
            dst.copy_(src, non_blocking=True)
        self.stats["d2h_bytes"] += dst.numel() * dst.element_size()

    def _load(self, k: int, b: int):
        """Bring unit k into buffer b on the h2d stream; returns the event after which it can be computed."""
        s, st = self.order[k], self.streams
        with st.on(st.h2d):
            stage = self.staging[b][:s.numel] if self.staging[b] is not None else None
            start = st.event(timing=True) if self.time_transfers else None
            if start is not None:
                start.record(st.h2d)
            self._copy_in(self.buffers[b][:s.numel], s.flat, stage)
        done = st.event(timing=True) if start is not None else self._event("loaded", k)
        done.record(st.h2d)
        if start is not None:
            self._transfer_times.append((start, done, s.flat.numel() * s.flat.element_size()))
        return done

    def h2d_transfer_rate(self) -> Optional[float]:
        """Bytes per second of the timed uploads while they were running (not averaged over the step), then forget
        them. Waits for them to finish: call it after the timed steps, never inside one."""
        if not self._transfer_times:
            return None
        seconds = sum(self.streams.elapsed_s(start, end) for start, end, _ in self._transfer_times)
        nbytes = sum(n for _, _, n in self._transfer_times)
        self._transfer_times = []
        return nbytes / seconds if seconds > 0 else None

    def upload_stall_s(self) -> Optional[float]:
        """Seconds the compute stream waited for uploads during the timed passes (0 where every upload was ready
        before compute reached its unit), then forget them. Waits for the timed passes to finish."""
        if not self._stall_times:
            return None
        stalled = sum(self.streams.elapsed_s(before, after) for before, after in self._stall_times)
        self._stall_times = []
        return stalled

    def round_to_storage(self, unit: Unit) -> None:
        """Round a resident unit, just updated in the compute dtype, to what the store will hold (on the current
        stream, through the buffer's staging). The forwards then see the stored parameters, so training does not
        depend on whether an update was fused into a forward or applied before (a flush, an eager update)."""
        k = self.index.get(id(unit))
        if k is None or not self._rounds or not self._converts(self.order[k]):
            return
        b = self._buffer_of(k)
        self._round(self.buffers[b][:self.order[k].numel], self.staging[b])

    @staticmethod
    def _round(values: torch.Tensor, staging: torch.Tensor) -> None:
        stage = staging[:values.numel()]
        stage.copy_(values)
        values.copy_(stage)

    def _views(self, k: int, b: Optional[int]) -> list[torch.Tensor]:
        """Unit k's parameter views into device buffer b (None: into its store), made once: the buffers and the
        store live as long as the pipeline, and re-pointing is a per-unit cost on the host's critical path."""
        views = self._view_cache.get((k, b))
        if views is None:
            s = self.order[k]
            views = self._view_cache[(k, b)] = s.views(s.flat if b is None else self.buffers[b][:s.numel])
        return views

    def _point(self, k: int, b: int) -> None:
        self.order[k].point_views(self._views(k, b))

    def _store(self, k: int, b: int) -> None:
        """Write unit k back from buffer b into the store (on the current stream, the d2h stream)."""
        s = self.order[k]
        stage = self.staging[b][:s.numel] if self.staging[b] is not None else None
        self._copy_out(s.flat, self.buffers[b][:s.numel], stage)

    def _unpoint(self, k: int) -> None:
        self.order[k].point_views(self._views(k, None))

    def _written_back(self, k: int, dirty: bool) -> bool:
        return dirty

    def enter(self, unit: Unit) -> None:
        k = self.index.get(id(unit))
        if k is None:
            return                                    # a resident unit
        if k not in self._uploaded:                   # not prefetched (a unit ran out of the expected order)
            self.stats["order_misses"] += 1
            self._upload(k)
        st = self.streams
        before = st.event(timing=True) if self.time_transfers else None
        if before is not None:
            before.record(st.compute)
        st.compute.wait_event(self._uploaded[k])
        if before is not None:
            after = st.event(timing=True)
            after.record(st.compute)
            self._stall_times.append((before, after))
        self._point(k, self._buffer_of(k))
        self._log("compute_begin", k)

    def repoints(self, unit: Unit) -> bool:
        return id(unit) in self.index           # exit points an offloaded unit's parameters at its store

    def exit(self, unit: Unit, dirty: bool) -> None:
        k = self.index.get(id(unit))
        if k is None:
            return
        b = self._buffer_of(k)
        st = self.streams
        computed = self._event("computed", k)
        computed.record(st.compute)
        self._log("compute_end", k)
        self._unpoint(k)        # first: whatever fails below, the parameters point at the store, not at a buffer
        self._release(k, b, computed, self._written_back(k, dirty))
        self._uploaded.pop(k, None)
        self._occupant[b] = None
        pos = self._pos.get(k)
        if pos is not None and pos + self.depth + 1 < len(self._pass):
            nxt = self._pass[pos + self.depth + 1]
            if nxt not in self._uploaded:
                self._upload(nxt)

    def synchronize(self) -> None:
        """Wait (host) until every transfer touching the store has finished: offloads have landed in it and uploads
        have finished reading it (a direct forward's last uploads may still be reading when a host writer, such as a
        checkpoint load, comes next). Only for host-side readers and writers of the store."""
        self.streams.h2d.synchronize()
        self.streams.d2h.synchronize()
