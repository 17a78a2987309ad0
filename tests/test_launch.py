"""Launch helpers: the MPI discovery never leaves ranks waiting on a failed rank 0, and run_ranks never leaves a
rank running after it returns or raises."""
import re
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


def _fake_tools(tmp_path):
    """A python, torchrun and deepspeed that print the launch environment they were given (the scripts find the
    last two beside $PY): no GPU, and a free port when asked for one."""
    import os
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    report = '#!/bin/bash\necho "GLOO=${GLOO_SOCKET_IFNAME:-unset} ADDR=${MASTER_ADDR:-unset} ARGS=$*"\n'
    (bin_dir / "python").write_text('#!/bin/bash\nif [ "$1" = -c ]; then\n    case "$2" in *socket*) echo 29999 ;; '
                                    '*) exit 1 ;; esac\n    exit 0\nfi\n' + report.split("\n", 1)[1])
    for name in ("torchrun", "deepspeed"):
        (bin_dir / name).write_text(report)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "GLOO_SOCKET_IFNAME")}
    return {**env, "PY": str(bin_dir / "python")}


def _launch_script(tmp_path, name, env):
    import os
    return subprocess.run(["bash", os.path.join(local_ranks.ROOT, "launch", name), "--steps", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)


def test_launch_scripts_use_loopback_on_one_node_only(tmp_path):
    """On CPU-only nodes the scripts set GLOO_SOCKET_IFNAME=lo, and did so on several nodes too, where the nodes then
    could not connect. One node: lo and 127.0.0.1; several (torchrun's NNODES, a HOSTFILE, MPI_ARGS naming hosts):
    neither, and a hostfile without MASTER_ADDR is refused at once (127.0.0.1 is not node 0 for the others)."""
    import shutil
    env = _fake_tools(tmp_path)
    one = _launch_script(tmp_path, "torchrun.sh", {**env, "NPROC": "1"})
    assert one.returncode == 0 and "GLOO=lo ADDR=127.0.0.1" in one.stdout, one.stdout + one.stderr
    many = _launch_script(tmp_path, "torchrun.sh", {**env, "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1",
                                                    "MASTER_PORT": "29500"})
    assert many.returncode == 0 and "GLOO=unset ADDR=10.0.0.1" in many.stdout, many.stdout + many.stderr
    hosts = tmp_path / "hosts"
    hosts.write_text("node0 slots=2\nnode1 slots=2\n")
    refused = _launch_script(tmp_path, "deepspeed_multinode.sh", {**env, "HOSTFILE": str(hosts)})
    assert refused.returncode == 2 and f"HOSTFILE={hosts} needs MASTER_ADDR" in refused.stderr
    ds = _launch_script(tmp_path, "deepspeed_multinode.sh", {**env, "HOSTFILE": str(hosts), "MASTER_ADDR": "node0"})
    assert ds.returncode == 0 and "GLOO=unset ADDR=node0" in ds.stdout and "--master_addr node0" in ds.stdout
    local = _launch_script(tmp_path, "deepspeed_multinode.sh", env)          # the example hostfile: this node
    assert local.returncode == 0 and "GLOO=lo ADDR=127.0.0.1" in local.stdout, local.stdout + local.stderr
    if shutil.which("mpirun") is None:
        return
    for mpi_args, gloo in (("", "GLOO=lo"), ("--host localhost:1", "GLOO=unset")):
        mpi = _launch_script(tmp_path, "mpirun.sh", {**env, "NPROC": "1", "MPI_ARGS": mpi_args})
        assert mpi.returncode == 0 and gloo in mpi.stdout, (mpi_args, mpi.stdout + mpi.stderr)


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", *launch_env._MPI_VARS)


@pytest.fixture
def launch_vars(monkeypatch):
    """A clean launch environment to set per case (monkeypatch restores the process's)."""
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return lambda **values: [monkeypatch.setenv(k, str(v)) for k, v in values.items()]


@pytest.mark.parametrize("given, missing", [
    ({"RANK": 1, "WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500}, "LOCAL_RANK is not set"),
    ({"RANK": 1, "WORLD_SIZE": 2, "LOCAL_RANK": 1, "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
    ({"RANK": 1, "WORLD_SIZE": 2, "LOCAL_RANK": 1}, "MASTER_ADDR, MASTER_PORT are not set"),
    ({"RANK": 1}, "RANK is set (1) but WORLD_SIZE is not"),
    ({"WORLD_SIZE": 2}, "WORLD_SIZE is set (2) but RANK is not"),
    ({"RANK": 0, "WORLD_SIZE": "two"}, "WORLD_SIZE='two': must be a number of processes"),
    ({"SLURM_PROCID": 0, "SLURM_STEP_NUM_TASKS": 2}, "Slurm started 2 tasks but none has an MPI rank"),
])
def test_a_launch_that_names_several_processes_but_not_all_of_their_variables_is_refused(launch_vars, given, missing):
    """DeepSpeed's init ran its own MPI discovery where one of the five variables was missing: mpi4py's singleton
    made every process rank 0 of a world of 1, so each trained alone and said nothing (or took port 29500)."""
    launch_vars(**given)
    with pytest.raises(launch_env.LaunchError, match=re.escape(missing)):
        launch_env.ensure_launch_env()


def test_one_process_gets_the_rest_and_deepspeeds_local_size_is_read(launch_vars, monkeypatch):
    import os
    launch_vars(SLURM_PROCID=0, SLURM_NTASKS=8)        # a batch script's one process (its allocation has 8 tasks)
    launch_env.ensure_launch_env()
    assert os.environ["WORLD_SIZE"] == "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        monkeypatch.delenv(name)
    launch_vars(RANK=0, WORLD_SIZE=1)
    launch_env.ensure_launch_env()
    assert (os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1",
                                                                                                   "127.0.0.1")
    assert os.environ["MASTER_PORT"].isdigit()
    # DeepSpeed's launcher exports LOCAL_SIZE, not LOCAL_WORLD_SIZE: the ZeRO-3 partition group (one node by
    # default) spanned every node under it
    for name in ("LOCAL_WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(name)
    launch_vars(RANK=1, WORLD_SIZE=4, LOCAL_RANK=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500, LOCAL_SIZE=2)
    launch_env.ensure_launch_env()
    assert os.environ["LOCAL_WORLD_SIZE"] == "2"
    from ds_zo.parallel.dims import default_partition_size
    assert default_partition_size(4, None) == 2


def test_slurms_pmix_rank_is_an_mpi_launch_and_a_singleton_under_several_tasks_is_refused(tmp_path):
    """srun --mpi=pmix exports PMIX_RANK but no PMIX_SIZE: it was taken for a plain one-process run. It is an MPI
    launch now, and where MPI then sees one process of several tasks (no PMI reached it) the launch is refused."""
    import os
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(PMIX_RANK="0", SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29733")
    proc = subprocess.run([sys.executable, "-c", "from ds_zo.parallel.launch_env import ensure_launch_env; "
                           "ensure_launch_env()"], cwd=local_ranks.ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "Slurm started 2 tasks but MPI sees each as a job of its own" in proc.stderr, \
        proc.stderr[-2000:]


def test_a_signal_to_the_deepspeed_launch_script_ends_every_rank(tmp_path):
    """DeepSpeed's runner forwards SIGTERM to its ranks only on several nodes: `kill` of launch/deepspeed.sh (by
    `timeout`, a scheduler) ended the runner and left both ranks training. A stand-in runner starts two 'ranks'; the
    script's SIGTERM must end all three, and the script reports the failure."""
    import os
    import signal
    import time
    env = _fake_tools(tmp_path)
    pids = tmp_path / "pids"
    (tmp_path / "bin" / "deepspeed").write_text(
        '#!/bin/bash\nsleep 300 & echo $! >> "$PIDS"\nsleep 300 & echo $! >> "$PIDS"\necho $$ >> "$PIDS"\nwait\n')
    script = subprocess.Popen(["bash", os.path.join(local_ranks.ROOT, "launch", "deepspeed.sh"), "--steps", "1"],
                              cwd=tmp_path, env={**env, "PIDS": str(pids)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 30
        while not (pids.exists() and len(pids.read_text().split()) == 3) and time.time() < deadline:
            time.sleep(0.05)
        started = [int(p) for p in pids.read_text().split()]
        script.send_signal(signal.SIGTERM)
        assert script.wait(timeout=20) != 0

        def alive(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except FileNotFoundError:
                return False
        deadline = time.time() + 10
        while any(alive(p) for p in started) and time.time() < deadline:
            time.sleep(0.05)
        assert not [p for p in started if alive(p)], "processes the runner started outlived the script"
    finally:
        if script.poll() is None:
            script.kill()
        for pid in [int(p) for p in pids.read_text().split()] if pids.exists() else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_deepspeed_launch_script_keeps_stdin_for_the_ranks(tmp_path):
    """The runner now starts in the background (the script forwards signals to it), where a script's commands read
    /dev/null: pdb in a rank, or a prompt, needs the caller's stdin."""
    import os
    env = _fake_tools(tmp_path)
    (tmp_path / "bin" / "deepspeed").write_text('#!/bin/bash\nread -r line\necho "read: $line"\n')
    done = subprocess.run(["bash", os.path.join(local_ranks.ROOT, "launch", "deepspeed.sh")], cwd=tmp_path, env=env,
                          input="hello\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "read: hello" in done.stdout, done.stdout + done.stderr
