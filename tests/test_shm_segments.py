"""DeepSpeed's CPU all-reduce segments in /dev/shm are released once every rank has mapped them."""
import os

import pytest

from ds_zo.parallel import shm_segments
from ds_zo.parallel.shm_segments import release_shm_segment, segment_path


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setattr(shm_segments, "SHM_DIR", str(tmp_path))     # a stand-in for /dev/shm
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29123")
    return monkeypatch


def test_the_name_is_deepspeeds(env, tmp_path):
    assert segment_path(1) == str(tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29123_1")


def test_own_segment_is_unlinked_after_the_barrier_and_peers_are_left(env):
    env.setenv("LOCAL_SIZE", "2")
    for r in range(2):
        open(segment_path(r), "wb").close()
    order = []
    assert release_shm_segment(1, 2, barrier=lambda: order.append(os.path.exists(segment_path(1))))
    assert order == [True]                                   # the barrier ran while the segment still existed
    assert not os.path.exists(segment_path(1)) and os.path.exists(segment_path(0))


@pytest.mark.parametrize("local_size, world", [(None, 2), ("1", 2), ("2", 1), ("x", 2)])
def test_nothing_happens_where_deepspeed_made_no_segments(env, local_size, world):
    if local_size is not None:
        env.setenv("LOCAL_SIZE", local_size)
    else:
        env.delenv("LOCAL_SIZE", raising=False)
    open(segment_path(0), "wb").close()
    calls = []
    assert not release_shm_segment(0, world, barrier=lambda: calls.append(1))
    assert calls == [] and os.path.exists(segment_path(0))


def test_a_missing_segment_is_not_an_error(env):
    env.setenv("LOCAL_SIZE", "2")
    assert not release_shm_segment(0, 2, barrier=lambda: None)
