"""A CPU stand-in for CUDA streams that checks the offload pipeline's stream discipline (tests/test_stream_order.py).

On CPU the pipeline runs with no-op streams, in issue order, so a missing event wait cannot show there; on a GPU it is
a race that tiny models rarely expose. Here every stream, event and host synchronisation keeps a vector clock, and a
dispatch mode stamps each aten op that touches one of the pipeline's memories (device buffers, staging, shards,
all-gather buffers, the host store) with the clock of the stream current when it was issued. Two accesses to one
memory from different streams, at least one a write, must be ordered by an event wait or a host synchronisation as
CUDA would order them; every pair that is not is reported.

Only torch ops are seen: ds_zo's native CPU kernels (ds_zo/native) write through raw pointers, so the test runs
with them off, as the GPU build's path (Triton or torch ops) would run.

Rules, as on a GPU:
- an op runs on the stream current when it is issued (`Streams.on` switches it), after everything that stream had
  waited for and everything the host had synchronised with;
- `record` captures a stream's work so far; `wait_event` makes a stream wait for it (the recording at issue time);
- `synchronize` (event or stream) makes the host wait;
- the store is host memory: a `copy_` between it and device memory is a transfer on the current stream, any other op
  on it is the host's.
"""
from __future__ import annotations

import bisect
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _join(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if v > out.get(k, 0):
            out[k] = v
    return out


class Timeline:
    """The clocks of every stream and of the host, and the waits a test may drop on purpose (to show a race)."""

    def __init__(self, dropped_waits: frozenset = frozenset(), host_syncs: bool = True):
        self.host = {"host": 0}
        self.current = None
        self.streams: list[SimStream] = []
        self.dropped_waits = dropped_waits      # {(waiting stream, recording stream)}
        self.host_syncs = host_syncs

    def stamp(self, stream) -> tuple[str, dict]:
        """Issue one op on `stream` (None: the host) and return its clock."""
        if stream is None:
            self.host = dict(self.host)
            self.host["host"] += 1
            return "host", self.host
        stream.vc = _join(stream.vc, self.host)
        stream.vc[stream.name] = stream.vc.get(stream.name, 0) + 1
        return stream.name, stream.vc

    def host_waits_for(self, vc: dict) -> None:
        if self.host_syncs:
            self.host = _join(self.host, vc)


class SimStream:
    def __init__(self, timeline: Timeline, name: str):
        self.timeline, self.name, self.vc = timeline, name, {}
        timeline.streams.append(self)

    def wait_event(self, event) -> None:
        if event.vc is not None and (self.name, event.stream) not in self.timeline.dropped_waits:
            self.vc = _join(self.vc, event.vc)

    def synchronize(self) -> None:
        self.timeline.host_waits_for(self.vc)


class SimEvent:
    def __init__(self, timeline: Timeline):
        self.timeline, self.vc, self.stream = timeline, None, None

    def record(self, stream=None) -> None:
        stream = stream or self.timeline.current
        self.vc, self.stream = dict(stream.vc), stream.name

    def synchronize(self) -> None:
        if self.vc is not None:
            self.timeline.host_waits_for(self.vc)


class SimulatedStreams:
    """Streams' interface (ds_zo/offload/streams.py) over simulated CUDA streams: separate upload, write-back,
    compute and side streams, as on a GPU with overlap on."""

    def __init__(self, timeline: Timeline, overlap: bool):
        self.timeline = timeline
        self.cuda = False
        self.compute = SimStream(timeline, "compute")
        self.h2d = SimStream(timeline, "h2d") if overlap else self.compute
        self.d2h = SimStream(timeline, "d2h") if overlap else self.compute
        self._sides = 0
        timeline.current = self.compute

    def check_compute_stream(self) -> None:
        assert self.timeline.current is self.compute, "a pass began with another stream current"

    def side_stream(self):
        if self.h2d is self.compute:
            return self.h2d
        self._sides += 1
        return SimStream(self.timeline, f"side{self._sides}")

    def event(self, timing: bool = False):
        return SimEvent(self.timeline)

    def elapsed_s(self, start, end) -> float:
        end.synchronize()
        return 0.0

    @contextlib.contextmanager
    def on(self, stream):
        self.timeline.current = stream
        try:
            yield
        finally:
            self.timeline.current = self.compute


_METADATA_ONLY = {torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default,
                  torch.ops.aten.new_empty_strided.default}


class StreamOrderChecker(TorchDispatchMode):
    """Stamps every aten op on a registered memory and reports the conflicting pairs no wait orders."""

    def __init__(self, timeline: Timeline):
        super().__init__()
        self.timeline = timeline
        self._starts: list[int] = []
        self._regions: list[tuple[int, int, str, bool]] = []    # (start, end, name, is host memory)
        # per memory: stream -> (its clock at the access, what) of the last write / read there
        self._writes: dict[str, dict[str, tuple[int, str]]] = {}
        self._reads: dict[str, dict[str, tuple[int, str]]] = {}
        self.races: list[str] = []
        self.accesses: dict[str, int] = {}          # per stream (and host): ops on registered memory
        self.writes: dict[str, int] = {}            # of which writes

    def register(self, name: str, tensor, host: bool) -> None:
        if tensor is None or tensor.numel() == 0:
            return
        start = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
        region = (start, start + tensor.numel() * tensor.element_size(), name, host)
        i = bisect.bisect(self._starts, start)
        self._starts.insert(i, start)
        self._regions.insert(i, region)

    def register_pipeline(self, pipeline) -> None:
        for field in ("buffers", "staging", "shards", "gathered"):
            for b, t in enumerate(getattr(pipeline, field, None) or []):
                self.register(f"{field}[{b}]", t, host=False)
        for stored in pipeline.order:
            self.register(f"store[{stored.unit.name}]", stored.flat, host=True)

    def _region(self, t: torch.Tensor):
        if t.numel() == 0:
            return None
        ptr = t.data_ptr()
        i = bisect.bisect(self._starts, ptr) - 1
        if i >= 0 and ptr < self._regions[i][1]:
            return self._regions[i]
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.is_view or func in _METADATA_ONLY:
            return func(*args, **kwargs)          # made by the host at issue time: no data is read
        touched = []          # (region, writes)
        schema = func._schema
        collective = func.namespace == "c10d"      # their schemas mark no write: the first tensor is the output
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            writes = (arg.alias_info is not None and arg.alias_info.is_write) or (collective and i == 0)
            for t in tree_flatten(value)[0]:
                if isinstance(t, torch.Tensor):
                    region = self._region(t)
                    if region is not None:
                        touched.append((region, writes))
        if touched:
            device_side = any(not r[3] for r, _ in touched)
            for region, writes in touched:
                # host memory: a copy to or from device memory is a transfer on the current stream; else the host's
                on_host = region[3] and not (func is torch.ops.aten.copy_.default and device_side)
                self._access(region[2], writes, None if on_host else self.timeline.current, str(func))
        return func(*args, **kwargs)

    def _access(self, memory: str, writes: bool, stream, what: str) -> None:
        name, vc = self.timeline.stamp(stream)
        self.accesses[name] = self.accesses.get(name, 0) + 1
        if writes:
            self.writes[name] = self.writes.get(name, 0) + 1
        earlier = [self._writes.get(memory, {})] + ([self._reads.get(memory, {})] if writes else [])
        for by_stream in earlier:
            for other, (tick, other_what) in by_stream.items():
                if other != name and tick > vc.get(other, 0):
                    self.races.append(f"{memory}: {other_what} on {other} is not ordered before "
                                      f"{'write' if writes else 'read'} {what} on {name}")
        table = self._writes if writes else self._reads
        table.setdefault(memory, {})[name] = (vc[name], what)
