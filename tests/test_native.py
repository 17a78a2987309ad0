"""The optional native chunk sampler: built once, imported without the compiler afterwards, never a hang on a lock
left by a killed build, and a clean fallback (same values) where it cannot be built."""
import logging
import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.utils.cpp_extension

from ds_zo import native
from ds_zo.perturb import PerturbationGenerator


@pytest.fixture
def fresh(monkeypatch):
    """chunk_draws() as on first use in a new process."""
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_unavailable", None)


def test_fallback_when_the_build_fails(fresh, monkeypatch, caplog):
    def no_compiler():
        raise RuntimeError("Error building extension\ng++: command not found")
    monkeypatch.setattr(native, "_build", no_compiler)
    with caplog.at_level(logging.WARNING, logger="ds_zo.native"):
        assert native.chunk_draws() is None
    assert "g++: command not found" in native.unavailable() and "Python threads" in caplog.text
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = PerturbationGenerator(chunk_elements=500).z(1, 0, 3, 4000)
        torch.set_num_threads(2)
        gen = PerturbationGenerator(chunk_elements=500)
        assert torch.equal(gen.z(1, 0, 3, 4000), serial) and gen._pool is not None   # the Python pool drew
    finally:
        torch.set_num_threads(before)


def test_turned_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("DS_ZO_NATIVE", "0")
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("must not build"))
    assert native.chunk_draws() is None and "DS_ZO_NATIVE=0" in native.unavailable()


@pytest.mark.parametrize("age_s, removed", [(3600, True), (5, False)])
def test_a_lock_left_by_a_killed_build_is_removed(tmp_path, monkeypatch, age_s, removed):
    """torch's loader waits forever for its lock file: an old one (a killed build) is removed first, a young one
    (a build running in another process) is left to torch, which waits for it."""
    monkeypatch.setenv("DS_ZO_NATIVE_DIR", str(tmp_path))
    directory = native.build_directory()
    os.makedirs(directory)
    lock = os.path.join(directory, "lock")
    open(lock, "w").close()
    os.utime(lock, (time.time() - age_s,) * 2)
    seen = {}

    def fake_load(**kw):
        seen.update(kw, lock_present=os.path.exists(lock))
        return SimpleNamespace(draw_chunks=None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    native._build()
    assert seen["lock_present"] is not removed and seen["build_directory"] == directory
    assert "-fopenmp" in seen["extra_cflags"] and "-ffp-contract=off" in seen["extra_cflags"]


def test_a_built_library_is_imported_without_the_compiler(monkeypatch):
    """After the set-up's build, loading needs neither torch's loader (nor its lock file) nor a compiler."""
    assert native.chunk_draws() is not None, f"native sampler not built: {native.unavailable()}"
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: pytest.fail("must not compile again"))
    module = native._build()
    out = torch.empty(64)
    module.draw_chunks([out], [123], 0.5, True)
    g = torch.Generator().manual_seed(123)
    assert torch.equal(out, torch.empty(64).normal_(generator=g) * 0.5)
    with pytest.raises(RuntimeError, match="at least 16 elements"):
        module.draw_chunks([torch.empty(8)], [1], 1.0, True)
