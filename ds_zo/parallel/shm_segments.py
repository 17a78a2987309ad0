"""Remove the shared-memory segment DeepSpeed's CPU backend leaves behind.

When every rank is on one node (LOCAL_SIZE == world size, one rank included; the `deepspeed` launcher exports
LOCAL_SIZE), DeepSpeed's CPU communication op creates one POSIX shared-memory segment per rank for its low-latency
all-reduce (/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, 66 MiB) and never unlinks
it. Each such run left world × 66 MiB of tmpfs, which is RAM, until reboot: on the development machine 134 runs had
left 18 GB.

Once every rank has mapped its peers' segments the names are no longer needed: the mappings outlive the unlink. So
after a barrier (every rank has returned from DeepSpeed's initialisation, which maps all segments before it returns)
each rank unlinks its own segment. A rank that dies later leaves nothing behind either. DeepSpeed's op initialises
once per process, so this runs at most once per process, with the names of that first initialisation.
"""
from __future__ import annotations

import os

SHM_DIR = "/dev/shm"
PREFIX = "deepspeed_allreduce_buffer"
_released = False      # this process's segment was handled (DeepSpeed makes at most one per process)


def segment_path(rank: int) -> str:
    """The segment DeepSpeed's CPU op creates for `rank`, named from this process's environment as DeepSpeed does
    (its uid printed as a C int)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    uid = os.getuid()
    uid = uid - (1 << 32) if uid >= 1 << 31 else uid
    return os.path.join(SHM_DIR, f"{PREFIX}_{uid}_{addr}_{port}_{rank}")


def segments_created(world: int) -> bool:
    """DeepSpeed creates the segments only when it is told all ranks are local (its own test: LOCAL_SIZE == world)."""
    try:
        return world >= 1 and int(os.environ.get("LOCAL_SIZE", "0")) == world
    except ValueError:
        return False


def deepspeed_shm_op_loaded() -> bool:
    """Whether DeepSpeed's communication backend loaded its CPU shared-memory op (it is not built on every machine)."""
    from deepspeed.comm import comm as ds_comm
    return getattr(getattr(ds_comm, "cdb", None), "shm_comm_op", None) is not None


def release_shm_segment(rank: int, world: int, barrier, op_loaded: bool) -> bool:
    """Unlink this rank's segment after `barrier()` (all ranks past DeepSpeed's init); True if one was removed."""
    global _released
    if _released or not op_loaded or not segments_created(world):
        return False
    barrier()
    _released = True
    try:
        os.unlink(segment_path(rank))
    except OSError:      # not there (another name scheme) or not removable: nothing more this process can do
        return False
    return True


def leftover_shm_segments(port: int | str) -> list[str]:
    """Segments of the run on `port` still in /dev/shm (any rank, address and user): what a run should not leave."""
    suffix = f"_{port}_"
    return sorted(f for f in os.listdir(SHM_DIR) if f.startswith(PREFIX) and suffix in f) \
        if os.path.isdir(SHM_DIR) else []
