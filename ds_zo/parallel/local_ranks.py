"""Start N real ranks of a Python program on 127.0.0.1 (gloo over loopback), as torchrun would, and collect their
exit codes and output: the one launcher the multi-process tests and benchmarks share."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the source checkout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_ranks(world: int, argv: list[str], timeout: float = 240, local_world: int | None = None) -> list[dict]:
    """Run `python argv...` as `world` ranks; returns per rank {rc, out, err, seconds}. Kills all on timeout."""
    port = free_port()
    procs = []
    start = time.time()
    try:
        for r in range(world):
            env = loopback_env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r, LOCAL_WORLD_SIZE=local_world or world,
                               MASTER_PORT=port)
            procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        results = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=max(1.0, timeout - (time.time() - start)))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                out, err = _drain(p)
                err += "\n[local_ranks] timed out"
            results.append({"rc": p.returncode, "out": out, "err": err, "seconds": time.time() - start})
        return results
    finally:      # an interrupt, a failed start of a later rank: no rank outlives the call
        for p in procs:
            if p.poll() is None:
                p.kill()
                _drain(p)


def _drain(p: subprocess.Popen) -> tuple[str, str]:
    """The output of a killed rank, without waiting on pipes a surviving grandchild (a compiler it started) may
    still hold open."""
    try:
        return p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        for pipe in (p.stdout, p.stderr):
            if pipe is not None:
                pipe.close()
        p.wait()
        return "", "[local_ranks] output lost: a child of the killed rank kept its pipes open"
