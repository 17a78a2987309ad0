"""Rank discovery for the launchers ds_zo supports.

`deepspeed` and `torchrun` export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under `mpirun`
(Open MPI, MPICH, Slurm's PMI) only the MPI runtime knows the layout: ds_zo asks it through mpi4py and exports the same
variables before DeepSpeed initialises, because DeepSpeed's own MPI discovery takes MASTER_ADDR from `hostname -I`,
which is never the loopback address a single-node run should use. A plain `python` run is one rank on loopback.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys

from .local_ranks import free_port

# an MPI launcher's variables (Slurm's PMIx plugin exports PMIX_RANK but not PMIX_SIZE)
_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE",
             "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """The launch environment does not describe this process's place in the job; the message says what is
    missing. Without it DeepSpeed's own MPI discovery would make each process a job of its own (rank 0 of 1)."""


def _slurm_tasks() -> int:
    """How many tasks Slurm's srun started for this job step (1 outside an srun step). Not SLURM_NTASKS: a batch
    script sees its allocation's task count there while it runs as one process."""
    value = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    return int(value) if value.isdigit() and "SLURM_PROCID" in os.environ else 1


def _rank0_value(comm, make):
    """Rank 0's make() broadcast to every rank. MPI collectives have no timeout: if make() fails on rank 0, the job
    is aborted with the reason rather than leaving the other ranks waiting in the broadcast forever."""
    value = None
    if comm.Get_rank() == 0:
        try:
            value = make()
        except Exception as e:
            print(f"ds_zo: rank 0 could not set up the launch ({type(e).__name__}: {e}); aborting the MPI job",
                  file=sys.stderr, flush=True)
            comm.Abort(1)
    return comm.bcast(value, root=0)


def _node_address() -> str:
    """This node's address for the other nodes' ranks to reach: never a loopback one (Debian-style hosts resolve
    their own name to 127.0.1.1), which would only fail after the rendezvous timeout on the other nodes."""
    addr = socket.gethostbyname(socket.gethostname())
    if ipaddress.ip_address(addr).is_loopback:
        raise RuntimeError(f"this host's name resolves to the loopback address {addr}, which ranks on other nodes "
                           "cannot reach; set MASTER_ADDR to this node's address")
    return addr


def _mpi_env() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size == 1 and _slurm_tasks() > 1 and "OMPI_COMM_WORLD_SIZE" not in os.environ:   # (mpirun's size is asked for)
        raise LaunchError(f"Slurm started {_slurm_tasks()} tasks but MPI sees each as a job of its own (size 1): "
                          "launch them with srun --mpi=pmix (or pmi2, whichever this cluster's MPI was built with), "
                          "or export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each task")
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    single_node = comm.allreduce(1 if local_size == size else 0, op=MPI.MIN) == 1
    if "MASTER_ADDR" in os.environ:
        addr = os.environ["MASTER_ADDR"]
    elif single_node:
        addr = "127.0.0.1"
    else:
        addr = _rank0_value(comm, _node_address)
    port = os.environ.get("MASTER_PORT") or str(_rank0_value(comm, free_port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(local_size), MASTER_ADDR=addr, MASTER_PORT=port)
    if single_node:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def ensure_launch_env() -> None:
    """Make RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT describe this process, or refuse
    (LaunchError) where the environment names a job of several processes but not all of them."""
    given = [v for v in ("RANK", "WORLD_SIZE") if v in os.environ]
    if len(given) == 2:
        world = os.environ["WORLD_SIZE"]
        if not world.isdigit() or int(world) < 1:
            raise LaunchError(f"WORLD_SIZE={world!r}: must be a number of processes (>= 1)")
        if int(world) > 1:
            missing = [v for v in _TORCH_VARS if not os.environ.get(v)]
            if missing:
                raise LaunchError(f"RANK={os.environ['RANK']} WORLD_SIZE={world} name a job of several processes, "
                                  f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: each "
                                  f"process needs {', '.join(_TORCH_VARS)} (torchrun and the deepspeed launcher set "
                                  "them all)")
            if "LOCAL_WORLD_SIZE" not in os.environ and os.environ.get("LOCAL_SIZE"):
                os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]   # DeepSpeed's launcher's name for it
        else:
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        return
    if len(given) == 1:
        other = "WORLD_SIZE" if given[0] == "RANK" else "RANK"
        raise LaunchError(f"{given[0]} is set ({os.environ[given[0]]}) but {other} is not: set both (and LOCAL_RANK, "
                          "MASTER_ADDR, MASTER_PORT) for a job of several processes, or neither for one process")
    if any(v in os.environ for v in _MPI_VARS):
        _mpi_env()
        return
    if _slurm_tasks() > 1:
        raise LaunchError(f"Slurm started {_slurm_tasks()} tasks but none has an MPI rank (no PMI/PMIx variables): "
                          "launch them with srun --mpi=pmix (or pmi2), or export RANK, WORLD_SIZE, LOCAL_RANK, "
                          "MASTER_ADDR and MASTER_PORT in each task")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
