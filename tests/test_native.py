"""The optional native chunk sampler: built once, imported without the compiler afterwards, never a hang on a lock
left by a killed build, and a clean fallback (same values) where it cannot be built."""
import logging
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.utils.cpp_extension

from ds_zo import native
from ds_zo.perturb import PerturbationGenerator


def needs_native():
    """The native sampler is optional: its tests skip where the user turned it off or no C++ compiler exists (the
    set-up installs g++ where it can); with a compiler it must have been built."""
    if os.environ.get("DS_ZO_NATIVE") == "0" or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("native sampler turned off or no C++ compiler")
    assert native.chunk_draws() is not None, f"native sampler not built: {native.unavailable()}"


@pytest.fixture
def fresh(monkeypatch):
    """chunk_draws() as on first use in a new process."""
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_unavailable", None)


def test_fallback_when_the_build_fails(fresh, monkeypatch, caplog):
    monkeypatch.delenv("DS_ZO_NATIVE", raising=False)
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


def _fake_load(seen: dict, lock: str):
    def load(**kw):
        seen.update(kw, lock_present=os.path.exists(lock))
        return SimpleNamespace(draw_chunks=None)
    return load


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path, monkeypatch):
    """torch's loader waits forever for its lock file. Builders take turns on an flock, so a torch lock found by the
    builder whose turn it is was left by a build that died: it is removed, however young. A half-written library
    (no completion marker) is rebuilt, never imported."""
    monkeypatch.setenv("DS_ZO_NATIVE_DIR", str(tmp_path))
    directory = native.build_directory()
    os.makedirs(directory)
    lock = os.path.join(directory, "lock")
    open(lock, "w").close()
    with open(os.path.join(directory, "ds_zo_chunk_draws.so"), "wb") as f:
        f.write(b"\x7fELF truncated")
    seen = {}
    monkeypatch.setattr(torch.utils.cpp_extension, "load", _fake_load(seen, lock))
    native._build()
    assert seen["lock_present"] is False and seen["build_directory"] == directory
    assert "-fopenmp" in seen["extra_cflags"] and "-ffp-contract=off" in seen["extra_cflags"]
    assert os.path.exists(os.path.join(directory, "complete"))


def test_a_builder_that_died_does_not_block_the_next(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ZO_NATIVE_DIR", str(tmp_path))
    directory = native.build_directory()
    os.makedirs(directory)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(120)"), os.path.join(directory, "build.flock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(native, "_BUILD_WAIT_S", 0.5)
        monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: pytest.fail("not my turn"))
        with pytest.raises(TimeoutError, match="another process has been building"):
            native._build()                     # a live builder: wait, then give up (the caller falls back)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        seen = {}
        monkeypatch.setattr(torch.utils.cpp_extension, "load", _fake_load(seen, os.path.join(directory, "lock")))
        native._build()                         # the OS released the dead builder's turn
        assert seen["build_directory"] == directory
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_a_built_library_is_imported_without_the_compiler(monkeypatch):
    """After the set-up's build, loading needs neither torch's loader (nor its lock file) nor a compiler."""
    needs_native()
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: pytest.fail("must not compile again"))
    module = native._build()
    out = torch.empty(64)
    module.draw_chunks([out], [123], 0.5, True)
    g = torch.Generator().manual_seed(123)
    assert torch.equal(out, torch.empty(64).normal_(generator=g) * 0.5)
    with pytest.raises(RuntimeError, match="at least 16 elements"):
        module.draw_chunks([torch.empty(8)], [1], 1.0, True)
