"""Streams and events for the offload pipeline: CUDA streams ordered by events, or no-op stand-ins with the same
interface so the same scheduler runs (synchronously, in issue order) on CPU-only machines and in CI."""
from __future__ import annotations

import contextlib
import time

import torch


class _NoOpEvent:
    """On CPU every operation has finished when the next is issued: recording the time is all an event can do."""

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


class _NoOpStream:
    def wait_event(self, event):
        pass

    def synchronize(self):
        pass


class Streams:
    """h2d (uploads), d2h (offloads) and compute. With overlap=False, or without CUDA, every operation runs on one
    stream in issue order (on CPU: synchronously)."""

    def __init__(self, device: torch.device, overlap: bool):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.h2d = torch.cuda.Stream(device) if overlap else self.compute
            self.d2h = torch.cuda.Stream(device) if overlap else self.compute
        else:
            self.compute = self.h2d = self.d2h = _NoOpStream()
        self._switches: dict[int, _Switch] = {}

    def check_compute_stream(self) -> None:
        """The pipeline orders uploads, compute and write-backs around the stream current when the engine was built;
        kernels go to the stream current when they run. A pass under `torch.cuda.stream(other)` would compute without
        waiting for its uploads, so it is refused."""
        if self.cuda and torch.cuda.current_stream(self.compute.device) != self.compute:
            raise RuntimeError(f"ds_zo: the offload pipeline computes on the CUDA stream that was current when the "
                               f"engine was built ({self.compute}), but this step or forward runs under "
                               f"{torch.cuda.current_stream(self.compute.device)}: run train_batch and the model's "
                               "forwards outside `with torch.cuda.stream(...)`, or build the engine inside it")

    def side_stream(self):
        """One more stream for work that should overlap the others (the resliced all-gather): its own CUDA stream
        where streams overlap, else the upload stream (everything in issue order)."""
        overlapping = self.cuda and self.h2d is not self.compute
        return torch.cuda.Stream(self.compute.device) if overlapping else self.h2d

    def event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing) if self.cuda else _NoOpEvent()

    def elapsed_s(self, start, end) -> float:
        """Seconds between two recorded events (timing events on CUDA; waits for `end`)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000
        return end.t - start.t

    def on(self, stream):
        """A context in which `stream` is current, then the compute stream again (the pipeline issues from the
        compute stream: check_compute_stream). Made once per stream: torch.cuda.stream(s) asks for the current
        device and stream on every entry, host time on every unit visit of a host-bound step."""
        if not self.cuda:
            return _NULL
        switch = self._switches.get(id(stream))
        if switch is None or switch.stream is not stream:     # (an id outlives its object: a dead stream's id)
            switch = self._switches[id(stream)] = _Switch(stream, self.compute)
        return switch


_NULL = contextlib.nullcontext()


class _Switch:
    """`with`: the stream current, then the one to return to (and the device current before, if the stream's
    device was not: torch.cuda.set_stream also makes the stream's device current). Not for nesting: it returns to
    `back`, not to whatever was current, so entering a switch again inside itself is refused rather than left to put
    later work on the wrong stream (a switch to another stream inside one is not detected: nothing nests today)."""

    def __init__(self, stream, back):
        self.stream, self.back = stream, back
        self.device = stream.device_index
        self._device_before = None
        self._inside = False

    def __enter__(self):
        if self._inside:
            raise RuntimeError(f"ds_zo: the switch to {self.stream} was entered again inside itself: its exit would "
                               "make the compute stream current too early")
        before = torch.cuda.current_device()
        self._device_before = before if before != self.device else None
        torch.cuda.set_stream(self.stream)
        self._inside = True

    def __exit__(self, *exc):
        self._inside = False
        torch.cuda.set_stream(self.back)
        if self._device_before is not None:
            torch.cuda.set_device(self._device_before)
        return False
