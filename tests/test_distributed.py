"""DistZO2 layouts with real processes (gloo over 127.0.0.1): every layout trains exactly like one process."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dist_worker import GLOBAL_ROWS, run_case
from ds_zo.parallel.local_ranks import ROOT, free_port, loopback_env, run_ranks
from ds_zo.parallel.shm_segments import leftover_shm_segments
from models import tiny_model

pytestmark = pytest.mark.multiprocess
WORKER = os.path.join("tests", "dist_worker.py")
STEPS = 3


def _launch(tmp_path, world, cases, timeout=280, local_world=None):
    spec = tmp_path / f"spec{world}.json"
    out = tmp_path / f"out{world}"
    out.mkdir()
    spec.write_text(json.dumps({"out": str(out), "cases": cases}))
    results = run_ranks(world, [WORKER, str(spec)], timeout=timeout, local_world=local_world)
    for r, res in enumerate(results):
        assert res["rc"] == 0, f"rank {r} failed:\n{res['err'][-3000:]}"
    return out


def _load(out, name, rank):
    state = torch.load(out / f"{name}.rank{rank}.pt", weights_only=True)
    with open(out / f"{name}.rank{rank}.json") as f:
        return state, json.load(f)


def _layer_bytes(k=1):
    """Bytes of the decoder layers' parameters as one rank holds them with partition size k (each parameter padded
    to ceil(n / k), as ZeRO-3 pads it)."""
    model = tiny_model("llama", tied=False)
    return sum(math.ceil(p.numel() / k) * 4 for n, p in model.named_parameters() if ".layers." in n)


@pytest.fixture(scope="module")
def baseline():
    return run_case({"name": "base", "steps": STEPS}, out_dir=None)


def _assert_same(baseline, state, info, name):
    assert info["losses"] == pytest.approx(baseline["losses"], rel=1e-9), name
    assert info["grads"] == pytest.approx(baseline["grads"], rel=1e-6), name
    assert info["eval"] == pytest.approx(baseline["eval"], rel=1e-6), name
    for n, p in baseline["state"].items():
        torch.testing.assert_close(state[n], p, rtol=1e-5, atol=0, msg=lambda m: f"{name} {n}: {m}")


WORLD2 = [
    {"name": "pertp2", "pertp": 2},
    {"name": "dp2", "pertp": 1},
    {"name": "pertp2_offload", "pertp": 2, "offload": True},
    {"name": "dp2_offload_naive", "offload": True},
    {"name": "zero3_partition2", "stage": 3, "partition": 2, "uneven_eval": True},
    {"name": "zero3_partition1", "stage": 3, "partition": 1},
    {"name": "zero3_pertp2_node", "stage": 3, "pertp": 2},            # partition group = the node (2 ranks)
]
WORLD4 = [
    {"name": "dp2xpertp2", "pertp": 2},
    {"name": "dp4", "pertp": 1},
    {"name": "dp2xpertp2_offload", "pertp": 2, "offload": True},
    {"name": "zero3_partition4", "stage": 3, "partition": 4},
    {"name": "zero3_partition2_2d", "stage": 3, "partition": 2, "pertp": 2},
]


@pytest.mark.timeout(600)
def test_world_2_and_4_layouts_equal_one_process(tmp_path, baseline):
    from ds_zo.weights_fingerprint import weight_fingerprint
    base = weight_fingerprint(tiny_model("llama", False))     # what every rank records as the run's start
    for world, cases in ((2, WORLD2), (4, WORLD4)):
        out = _launch(tmp_path, world, [dict(c, steps=STEPS) for c in cases])
        for case in cases:
            for rank in range(world):
                state, info = _load(out, case["name"], rank)
                _assert_same(baseline, state, info, f"{case['name']} rank {rank}")
                assert info["pertp"] == case.get("pertp", 1) and info["dp"] == world // info["pertp"]
                assert info["base_weights"] == base, f"{case['name']} rank {rank}"
                assert info["samples"] == STEPS * GLOBAL_ROWS, f"{case['name']} rank {rank}"   # each row once
                _check_bytes(case, info, world)


def _check_bytes(case, info, world):
    """Per-rank transfer and collective bytes against the analytic formulas (3 steps; the first has no pending
    update to write back)."""
    stats = info["stats"]
    slots = 2 * case.get("q", 1)
    agree = info["partition"] * 8 if case.get("stage") == 3 and info["partition"] > 1 else 0   # forwards per rank
    assert stats["allreduce_bytes"] == (STEPS * ((2 * slots + 2) * 8 + agree) if world > 1 else 0)  # f64 sums etc.
    if case.get("stage") == 3:
        k = info["partition"]
        shard = _layer_bytes(k)
        assert stats["h2d_bytes"] == STEPS * shard                   # each rank uploads only its shard
        assert stats["d2h_bytes"] == (STEPS - 1) * shard             # and offloads only its shard
        assert stats["allgather_bytes"] == STEPS * (k - 1) * shard   # receives the other k - 1 shards
        assert info["store_bytes"] == shard                          # CPU master of the layers: 1/k of them
    elif case.get("offload"):
        assert stats["h2d_bytes"] == STEPS * _layer_bytes()
        assert stats["d2h_bytes"] == (STEPS - 1) * _layer_bytes()
        assert stats["allgather_bytes"] == 0
        assert info["store_bytes"] == _layer_bytes()                 # naive: every rank holds whole units
    else:
        assert stats["h2d_bytes"] == stats["d2h_bytes"] == stats["allgather_bytes"] == 0


@pytest.mark.timeout(400)
def test_a_run_resumed_from_a_checkpoint_continues_like_one_process(tmp_path, baseline):
    """Checkpoint after a step and continue in a new engine on a fresh model: every layout ends where the one-process
    run does. Under ZeRO-3 each rank saves its shards and rank 0 the resident parameters (the embedding, the final
    norm), which the other ranks must read from rank 0's file (they failed: "lacks parameter")."""
    cases = [{"name": "zero3_partition2_resumed", "stage": 3, "partition": 2, "resume_at": 2},
             {"name": "pertp2_resumed", "pertp": 2, "resume_at": 1},
             {"name": "dp2_resumed", "resume_at": 2}]
    out = _launch(tmp_path, 2, [dict(c, steps=STEPS) for c in cases])
    for case in cases:
        for rank in range(2):
            _assert_same(baseline, *_load(out, case["name"], rank), f"{case['name']} rank {rank}")


@pytest.mark.timeout(300)
def test_a_checkpoint_that_fails_on_one_rank_stops_every_rank_at_once(tmp_path):
    """A save into a folder one rank does not share (and the job's start-up check of such a folder), and a load whose
    only corrupt file is rank 1's ZeRO-3 shard file: rank 1 says what is wrong, rank 0 that rank 1 failed, at once.
    They waited in the next collective until the timeout blamed a dead peer (and a load restored rank 0's tensors
    before that). The failed load leaves the model as it was, and the ranks train on together."""
    case = {"name": "faults", "stage": 3, "partition": 2, "steps": 2, "checkpoint_faults_at": 1, "timeout": 40}
    out = _launch(tmp_path, 2, [case])
    infos = [_load(out, "faults", rank)[1] for rank in range(2)]
    errors = [info["faults"]["errors"] for info in infos]
    assert "rank 1 does not see" in errors[1]["save"]
    assert "the save folder must be on a file system" in errors[1]["save"]
    assert "writing the rank files of checkpoint 'global_step1' failed on rank 1" in errors[0]["save"]
    assert "--output_dir" in errors[1]["shared"]
    assert "rank 1 does not see the file rank 0 wrote" in errors[1]["shared"]
    assert "checking that every rank sees --output_dir" in errors[0]["shared"]
    assert "failed on rank 1" in errors[0]["shared"]
    assert not [f for f in os.listdir(out) if f.startswith(".ds_zo-shared")]
    assert "zo_rank_00001.safetensors is missing or does not match its checksum" in errors[1]["load"]
    assert "loading checkpoint 't' from" in errors[0]["load"] and "failed on rank 1" in errors[0]["load"]
    assert all(info["faults"]["unchanged"] for info in infos)
    assert infos[0]["losses"] == infos[1]["losses"] and len(infos[0]["losses"]) == 2


@pytest.mark.timeout(300)
def test_an_empty_shard_trains_and_evaluates_and_mismatched_data_is_refused(tmp_path, baseline):
    """A data-parallel rank may get no rows (a short last batch): it takes part in the step with zeros and the run
    is the one-process run. Under ZeRO-3 the ranks of a partition group must run as many forwards (each all-gathers
    every unit): different counts are refused on every rank at once, where they hung until the collective timeout
    and blamed a dead peer. Perturbation-parallel peers fed different batches are refused (g would mix them)."""
    uneven = {"0": [0, GLOBAL_ROWS], "1": [GLOBAL_ROWS, GLOBAL_ROWS]}
    out = _launch(tmp_path, 2, [{"name": "dp2_empty_shard", "shard_of_rank": uneven, "steps": STEPS}])
    for rank in range(2):
        _assert_same(baseline, *_load(out, "dp2_empty_shard", rank), f"empty shard rank {rank}")
    for case, message in (({"stage": 3, "partition": 2, "shard_of_rank": uneven},
                           "the ranks of a ZeRO-3 partition group would run [2, 0] forwards"),
                          ({"pertp": 2, "batch_differs_by_rank": True},
                           "must pass train_batch the same batch")):
        spec = tmp_path / "refused.json"
        spec.write_text(json.dumps({"out": str(tmp_path), "cases": [dict(case, name="refused", timeout=60)]}))
        results = run_ranks(2, [WORKER, str(spec)], timeout=120)
        for r, res in enumerate(results):
            assert res["rc"] != 0 and message in res["err"], f"rank {r}: {res['err'][-2000:]}"


@pytest.mark.timeout(300)
def test_zero3_with_bf16_reslices_bf16_shards_like_one_process(tmp_path):
    """ZeRO-3 reslicing over 2 ranks with bf16 enabled: the model is cast before it is partitioned, so the shards,
    the store and the all-gathers are bf16 (half the fp32 bytes), and the run is the one-process bf16 run with
    offload, bit for bit (before, it trained in fp32)."""
    one = run_case({"name": "bf16_base", "offload": True, "bf16": True, "steps": STEPS}, out_dir=None)
    assert {t.dtype for t in one["state"].values()} == {torch.bfloat16}
    case = {"name": "zero3_partition2_bf16", "stage": 3, "partition": 2, "bf16": True, "steps": STEPS}
    out = _launch(tmp_path, 2, [case])
    for rank in range(2):
        state, info = _load(out, case["name"], rank)
        assert info["losses"] == one["losses"] and info["grads"] == one["grads"]
        assert all(torch.equal(state[n], p) for n, p in one["state"].items()), f"rank {rank}"
        assert info["store_bytes"] == _layer_bytes(2) // 2                  # bf16: 2 bytes per element
        assert info["stats"]["allgather_bytes"] == STEPS * _layer_bytes(2) // 2


@pytest.mark.timeout(300)
def test_a_killed_rank_makes_the_others_fail_clearly(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp_path), "cases": [
        {"name": "kill", "pertp": 1, "steps": 50, "kill_rank": 1, "kill_at": 2, "timeout": 20}]}))
    results = run_ranks(2, [WORKER, str(spec)], timeout=200)
    assert results[1]["rc"] == -9                           # SIGKILLed
    assert results[0]["rc"] not in (0, None)
    assert "peer rank probably died" in results[0]["err"], results[0]["err"][-2000:]
    assert results[0]["seconds"] < 20 + 60                  # within the collective timeout (plus start-up)


@pytest.mark.timeout(300)
def test_a_checkpoint_saved_on_one_rank_only_fails_every_rank_clearly(tmp_path):
    """`if rank == 0: engine.save_checkpoint(...)` (every rank must call it, as in DeepSpeed): rank 0's first
    checkpoint collective meets rank 1's next step collective. Both ranks stop, neither hangs, and each says why: gloo's
    own abort names a collective mismatch, ds_zo's error names the collective and says every rank must make it."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp_path), "cases": [
        {"name": "save_alone", "pertp": 1, "steps": 4, "save_on_rank_only": 0, "timeout": 20}]}))
    results = run_ranks(2, [WORKER, str(spec)], timeout=200)
    for r, res in enumerate(results):
        assert res["rc"] not in (0, None), f"rank {r} did not fail"
        assert "collective mismatch" in res["err"] or "every rank must make the same calls" in res["err"], \
            f"rank {r}: {res['err'][-2000:]}"
        assert res["seconds"] < 20 + 60                      # within the collective timeout (plus start-up)


@pytest.mark.timeout(300)
def test_ranks_started_with_other_settings_refuse_to_start(tmp_path):
    """Ranks given other settings than rank 0's: another perturbation_parallel hung in new_group until the timeout,
    another num_perturbations crashed gloo, another seed or lr trained diverging models unsaid. Every rank now
    refuses at start-up, naming the ranks and the settings that differ."""
    for name, other, named in (("pertp", {"zero_order": {"perturbation_parallel": 1}}, "zero_order"),
                               ("seed_lr", {"zero_order": {"seed": 6}, "optimizer": {"params": {"lr": 1.0}}},
                                "zero_order, optimizer.params"),
                               ("micro", {"train_micro_batch_size_per_gpu": 1}, "batch sizes")):
        spec = tmp_path / f"{name}.json"
        case = {"name": name, "pertp": 2, "timeout": 60, "config_of_rank": {"1": other}}
        spec.write_text(json.dumps({"out": str(tmp_path), "cases": [case]}))
        results = run_ranks(2, [WORKER, str(spec)], timeout=200)
        for r, res in enumerate(results):
            assert res["rc"] not in (0, None), f"{name} rank {r} trained"
            assert f"rank 1 was started with other {named} than rank 0" in res["err"], res["err"][-2000:]
            assert res["seconds"] < 60, f"{name} rank {r} waited for the timeout"


@pytest.mark.timeout(300)
def test_ranks_with_different_z_samplers_refuse_to_start(tmp_path):
    """Torch's CUDA sampler depends on the GPU's SM count: ranks on different GPU models would draw different z for
    the same seed, and every rank says so at start-up instead of training on mismatched perturbations."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp_path), "cases": [
        {"name": "mixed", "pertp": 2, "z_stream_of_rank": {"1": "cuda/108x2048"}, "timeout": 20}]}))
    results = run_ranks(2, [WORKER, str(spec)], timeout=200)
    for r in results:
        assert r["rc"] not in (0, None)
        assert "ranks would draw different perturbations z (rank 0: cpu, rank 1: cuda/108x2048)" in r["err"], \
            r["err"][-2000:]


def _two_rank_launcher_run(tmp_path, cmd, env):
    spec = tmp_path / "spec.json"
    out = tmp_path / "out"
    out.mkdir()
    spec.write_text(json.dumps({"out": str(out), "cases": [{"name": "pertp2", "pertp": 2, "steps": STEPS}]}))
    proc = subprocess.run([*cmd, WORKER, str(spec)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher, ranks_flag", [("torchrun", "--nproc_per_node"), ("deepspeed", "--num_gpus")])
def test_torchrun_and_deepspeed_launchers(tmp_path, baseline, launcher, ranks_flag):
    exe = os.path.join(os.path.dirname(sys.executable), launcher)
    port = free_port()
    out = _two_rank_launcher_run(tmp_path, [exe, ranks_flag, "2", "--master_addr", "127.0.0.1",
                                            "--master_port", str(port)], loopback_env())
    for rank in range(2):
        _assert_same(baseline, *_load(out, "pertp2", rank), f"{launcher} rank {rank}")
    assert leftover_shm_segments(port) == []     # the deepspeed launcher makes DeepSpeed create them


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is not installed (launch/setup_env.sh installs it)")
def test_mpirun_launch_with_mpi4py_discovery(tmp_path, baseline):
    env = loopback_env()
    env.pop("MASTER_ADDR")                                  # discovered through mpi4py: loopback on one node
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "DS_ACCELERATOR", "-x", "PYTHONPATH",
           "-x", "OMP_NUM_THREADS", "-x", "GLOO_SOCKET_IFNAME", sys.executable]
    out = _two_rank_launcher_run(tmp_path, cmd, env)
    for rank in range(2):
        _assert_same(baseline, *_load(out, "pertp2", rank), f"mpirun rank {rank}")
