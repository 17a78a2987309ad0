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
    monkeypatch.setattr(native, "_fast_gaussian_off", None)


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


def _has_avx2_fma() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    return " avx2" in flags and " fma" in flags


def test_vectorised_gaussian_draws_are_torchs(monkeypatch):
    """Where the CPU has AVX2 and FMA the native sampler draws Gaussian chunks with its own vectorised mt19937 and
    Box-Muller, and they are torch's normal_ values bit for bit: every size class (groups of 16, the redrawn tail,
    twists of 624 words, the 2^20 chunk), seeds beyond 32 bits, several scales, many chunks at once; and with it
    turned off, ATen's sampler gives the same values."""
    needs_native()
    if not _has_avx2_fma():
        pytest.skip("the vectorised sampler needs AVX2 and FMA")
    module = native.chunk_draws()
    assert module.fast_gaussian() and native.fast_gaussian_off() is None
    rng = torch.Generator().manual_seed(7)
    sizes = [16, 17, 47, 623, 624, 625, 640, 1248, 1249, 9999, 2**20, 2**20 + 5]
    keys = [int(torch.randint(0, 2**62, (1,), generator=rng)) for _ in sizes]
    for scale in (1.0, 1e-3, 3.7):
        outs = [torch.empty(n) for n in sizes]
        module.draw_chunks(outs, keys, scale, True)
        for out, n, key in zip(outs, sizes, keys):
            want = torch.empty(n).normal_(0.0, scale, generator=torch.Generator().manual_seed(key))
            assert torch.equal(out, want), (n, key, scale)
    try:
        module.set_fast_gaussian(False)
        assert not module.fast_gaussian()
        slow = torch.empty(1000)
        module.draw_chunks([slow], [keys[0]], 0.5, True)
    finally:
        module.set_fast_gaussian(True)
    fast = torch.empty(1000)
    module.draw_chunks([fast], [keys[0]], 0.5, True)
    assert torch.equal(fast, slow)


def test_the_vectorised_sampler_is_turned_off_when_it_disagrees(fresh, monkeypatch, caplog):
    """ds_zo checks the vectorised sampler against torch's normal_ when it loads (another torch version, another CPU
    dispatch, another compiler could differ) and keeps ATen's sampler if a single value differs."""
    calls = []
    wrong = SimpleNamespace(fast_gaussian=lambda: True, set_fast_gaussian=calls.append,
                            draw_chunks=lambda outs, keys, scale, gaussian: [o.normal_(0.0, scale * 1.0001,
                                                                                   generator=torch.Generator()
                                                                                   .manual_seed(k))
                                                                          for o, k in zip(outs, keys)])
    monkeypatch.delenv("DS_ZO_NATIVE", raising=False)
    monkeypatch.setattr(native, "_build", lambda: wrong)
    with caplog.at_level(logging.WARNING, logger="ds_zo.native"):
        assert native.chunk_draws() is wrong
    assert calls == [False]
    assert "differs from torch's normal_" in native.fast_gaussian_off() and "sampler is off" in caplog.text


def test_training_is_the_same_with_the_vectorised_sampler_on_or_off():
    """Three ZO steps of a tiny HF model (z chunks of 500 values, so many whole and partial chunks; two drawing
    threads) give the same parameters bit for bit whichever Gaussian sampler the native helper uses."""
    needs_native()
    if not _has_avx2_fma():
        pytest.skip("the vectorised sampler needs AVX2 and FMA")
    import ds_zo
    from conftest import ds_config
    from models import assert_same_state, tiny_model, trained_state

    module = native.chunk_draws()
    results = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for fast in (True, False):
            module.set_fast_gaussian(fast)
            engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config(wd=0.1))
            engine.perturbations.chunk = 500
            results.append(trained_state(engine))
    finally:
        module.set_fast_gaussian(True)
        torch.set_num_threads(before)
    assert_same_state(*results)


def test_a_cpu_without_avx2_keeps_atens_sampler(fresh, monkeypatch):
    """Where the helper reports no AVX2/FMA the load-time check draws nothing and records why."""
    calls = []
    plain = SimpleNamespace(fast_gaussian=lambda: False, set_fast_gaussian=calls.append,
                            draw_chunks=lambda *a: pytest.fail("no draws needed to decide"))
    monkeypatch.delenv("DS_ZO_NATIVE", raising=False)
    monkeypatch.setattr(native, "_build", lambda: plain)
    assert native.chunk_draws() is plain
    assert native.fast_gaussian_off() == "the CPU lacks AVX2 or FMA" and calls == []


def test_marked_groups_of_a_chunk_are_its_values():
    """draw_groups forms only the marked groups of 16 values of a chunk (for a tied weight's rows): each is the
    whole chunk's value there, for sparse, dense, empty and full masks and chunk sizes around the 624-word twists;
    misuse is refused with what was wrong."""
    needs_native()
    if not _has_avx2_fma():
        pytest.skip("the vectorised sampler needs AVX2 and FMA")
    module = native.chunk_draws()
    rng = torch.Generator().manual_seed(3)
    for n in (16, 624, 640, 9984, 2**20):
        full = torch.empty(n)
        module.draw_chunks([full], [n + 11], 0.02, True)
        for frac in (0.0, 0.01, 0.5, 1.0):
            groups = (torch.rand(n // 16, generator=rng) < frac).to(torch.uint8)
            part = torch.full((n,), float("nan"))
            module.draw_groups(part, n + 11, 0.02, groups)
            marked = groups.bool().repeat_interleave(16)
            assert torch.equal(part[marked], full[marked]), (n, frac)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        module.draw_groups(torch.empty(40), 1, 1.0, torch.ones(2, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="one entry per 16 values"):
        module.draw_groups(torch.empty(64), 1, 1.0, torch.ones(3, dtype=torch.uint8))


def test_flush_to_zero_reaches_every_worker_and_leaves_them_as_they_were():
    """torch.set_flush_denormal sets the calling thread's FTZ/DAZ modes only: chunks that another thread of the native
    team took were drawn without them, unlike torch's normal_ (so values depended on which thread took a chunk).
    The workers take the caller's modes for the call and get their own back after it (torch's ops run on them)."""
    needs_native()
    module = native.chunk_draws()
    threads = torch.get_num_threads()
    keys = list(range(1, 9))                        # large chunks: every thread of the team takes some

    def draws_are_torchs(scale):
        outs = [torch.empty(2**20) for _ in keys]
        module.draw_chunks(outs, keys, scale, True)
        return [torch.equal(out, torch.empty(2**20).normal_(0.0, scale, generator=torch.Generator().manual_seed(k)))
                for out, k in zip(outs, keys)]

    try:
        torch.set_num_threads(2)
        torch.ones(1 << 20).mul(2).sum()            # the team exists before the modes change (threads inherit them)
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU cannot flush denormals")
        assert all(draws_are_torchs(1e-39))         # z * 1e-39: denormal, or 0 where flushed
        torch.set_flush_denormal(False)
        assert all(draws_are_torchs(1e-39))
        assert all(draws_are_torchs(1.0))
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
