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

_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


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
    """Make RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT describe this process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if "LOCAL_WORLD_SIZE" not in os.environ and os.environ["WORLD_SIZE"] == "1":
            os.environ["LOCAL_WORLD_SIZE"] = "1"
        return
    if any(v in os.environ for v in _MPI_SIZE_VARS):
        _mpi_env()
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
