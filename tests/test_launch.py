"""Launch helpers: the MPI discovery never leaves ranks waiting on a failed rank 0, and run_ranks never leaves a
rank running after it returns or raises."""
import subprocess
import sys

import pytest

from ds_zo.parallel import launch_env, local_ranks


class _FakeComm:
    def __init__(self, rank):
        self.rank, self.aborted, self.sent = rank, None, []

    def Get_rank(self):
        return self.rank

    def Abort(self, code):
        self.aborted = code
        raise SystemExit(code)          # MPI_Abort does not return

    def bcast(self, value, root=0):
        self.sent.append(value)
        return value if self.rank == root else "from rank 0"


def test_a_failure_on_rank_0_aborts_the_mpi_job_instead_of_leaving_the_broadcast_waiting(capsys):
    comm = _FakeComm(0)

    def broken():
        raise OSError("name or service not known")
    with pytest.raises(SystemExit):
        launch_env._rank0_value(comm, broken)
    assert comm.aborted == 1 and comm.sent == []
    assert "rank 0 could not set up the launch (OSError: name or service not known)" in capsys.readouterr().err
    assert launch_env._rank0_value(_FakeComm(0), lambda: 29500) == 29500
    other = _FakeComm(1)
    assert launch_env._rank0_value(other, lambda: pytest.fail("only rank 0 makes the value")) == "from rank 0"


def test_a_multi_node_master_address_is_never_loopback(monkeypatch):
    monkeypatch.setattr(launch_env.socket, "gethostbyname", lambda name: "127.0.1.1")
    with pytest.raises(RuntimeError, match="loopback address 127.0.1.1.*set MASTER_ADDR"):
        launch_env._node_address()
    monkeypatch.setattr(launch_env.socket, "gethostbyname", lambda name: "10.1.2.3")
    assert launch_env._node_address() == "10.1.2.3"


def test_run_ranks_kills_the_started_ranks_when_a_later_one_fails_to_start(monkeypatch):
    started = []
    real = subprocess.Popen

    def popen(cmd, **kw):
        if started:
            raise OSError("no more processes")
        started.append(real([sys.executable, "-c", "import time; time.sleep(60)"], **kw))
        return started[0]
    monkeypatch.setattr(local_ranks.subprocess, "Popen", popen)
    with pytest.raises(OSError, match="no more processes"):
        local_ranks.run_ranks(2, ["-c", "pass"], timeout=30)
    assert started[0].poll() is not None          # killed, not left sleeping


def test_torchrun_on_several_nodes_needs_one_master_address_and_port(tmp_path):
    """Each node running launch/torchrun.sh picked its own free port (and 127.0.0.1) when none was given, and the
    nodes waited for each other forever: with NNODES > 1 a missing MASTER_ADDR or MASTER_PORT is refused at once."""
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    script = os.path.join(local_ranks.ROOT, "launch", "torchrun.sh")
    for given in ({"MASTER_ADDR": "10.0.0.1"}, {"MASTER_PORT": "29611"}):
        proc = subprocess.run(["bash", script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env={**env, "NNODES": "2", "NODE_RANK": "1", **given})
        assert proc.returncode == 2 and "NNODES=2 needs MASTER_ADDR (node 0's address) and MASTER_PORT" in proc.stderr
