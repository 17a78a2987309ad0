"""DeepSpeed's CPU all-reduce segments in /dev/shm are released once every rank has mapped them."""
import os

import pytest

from ds_zo.parallel import shm_segments
from ds_zo.parallel.shm_segments import release_shm_segment, segment_path


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setattr(shm_segments, "SHM_DIR", str(tmp_path))     # a stand-in for /dev/shm
    monkeypatch.setattr(shm_segments, "_released", False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29123")
    return monkeypatch


def test_the_name_is_deepspeeds(env, tmp_path):
    assert segment_path(1) == str(tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29123_1")


@pytest.mark.parametrize("world, rank", [(2, 1), (1, 0)])
def test_own_segment_is_unlinked_after_the_barrier_and_peers_are_left(env, world, rank):
    """Also with one rank: DeepSpeed's test is LOCAL_SIZE == world size, which `deepspeed script.py` meets."""
    env.setenv("LOCAL_SIZE", str(world))
    for r in range(2):
        open(segment_path(r), "wb").close()
    order = []
    assert release_shm_segment(rank, world, lambda: order.append(os.path.exists(segment_path(rank))), True)
    assert order == [True]                                   # the barrier ran while the segment still existed
    assert not os.path.exists(segment_path(rank)) and os.path.exists(segment_path(1 - rank))


def test_once_per_process_with_the_first_names(env):
    """DeepSpeed's op initialises once per process: a second initialize (another port in the environment) must not
    unlink a segment of that name, which would be another job's."""
    env.setenv("LOCAL_SIZE", "2")
    open(segment_path(0), "wb").close()
    assert release_shm_segment(0, 2, lambda: None, True)
    env.setenv("MASTER_PORT", "29124")
    open(segment_path(0), "wb").close()
    calls = []
    assert not release_shm_segment(0, 2, lambda: calls.append(1), True)
    assert calls == [] and os.path.exists(segment_path(0))


@pytest.mark.parametrize("local_size, world, op_loaded", [(None, 2, True), ("1", 2, True), ("2", 1, True),
                                                          ("x", 2, True), ("2", 2, False)])
def test_nothing_happens_where_deepspeed_made_no_segments(env, local_size, world, op_loaded):
    if local_size is not None:
        env.setenv("LOCAL_SIZE", local_size)
    else:
        env.delenv("LOCAL_SIZE", raising=False)
    open(segment_path(0), "wb").close()
    calls = []
    assert not release_shm_segment(0, world, lambda: calls.append(1), op_loaded)
    assert calls == [] and os.path.exists(segment_path(0))


def test_a_missing_or_unremovable_segment_is_not_an_error(env, tmp_path):
    env.setenv("LOCAL_SIZE", "2")
    assert not release_shm_segment(0, 2, lambda: None, True)
    env.setattr(shm_segments, "_released", False)
    os.makedirs(segment_path(0))
    open(os.path.join(segment_path(0), "x"), "wb").close()      # a non-empty directory: unlink fails (not ENOENT)
    assert not release_shm_segment(0, 2, lambda: None, True)

