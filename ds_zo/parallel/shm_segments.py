"""Remove the shared-memory segments DeepSpeed's CPU backend leaves behind.

When every rank is on one node (LOCAL_SIZE == world size, which the `deepspeed` launcher exports), DeepSpeed's CPU
communication op creates one POSIX shared-memory segment per rank for its low-latency all-reduce
(/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, 66 MB each) and never unlinks it. Each
such run leaves world × 66 MB of tmpfs, which is RAM, until reboot: on the development machine 134 runs had left 18 GB.

Once every rank has mapped its peers' segments, the names are no longer needed: the mappings outlive the unlink. So
after a barrier (every rank has returned from DeepSpeed's initialisation, which maps all segments before returning)
each rank unlinks its own segment. A rank that dies later leaves nothing behind either.
"""
from __future__ import annotations

import os

SHM_DIR = "/dev/shm"
PREFIX = "deepspeed_allreduce_buffer"


def segment_path(rank: int) -> str:
    """The segment DeepSpeed's CPU op creates for `rank`, named from this process's environment as DeepSpeed does."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"{PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")


def segments_created(world: int) -> bool:
    """DeepSpeed creates the segments only when it is told all ranks are local (its own test)."""
    try:
        return world > 1 and int(os.environ.get("LOCAL_SIZE", "0")) == world
    except ValueError:
        return False


def release_shm_segment(rank: int, world: int, barrier) -> bool:
    """Unlink this rank's segment after `barrier()` (all ranks past DeepSpeed's init); True if one was removed."""
    if not segments_created(world):
        return False
    barrier()
    try:
        os.unlink(segment_path(rank))
    except FileNotFoundError:      # the op was not built (no compiler) or another name scheme: nothing to release
        return False
    return True


def leftover_shm_segments(port: int | str) -> list[str]:
    """Segments of the run on `port` still in /dev/shm (any rank, address and user): what a run should not leave."""
    suffix = f"_{port}_"
    return sorted(f for f in os.listdir(SHM_DIR) if f.startswith(PREFIX) and suffix in f) \
        if os.path.isdir(SHM_DIR) else []
