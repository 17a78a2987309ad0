"""Native helpers, compiled with torch's C++ extension loader (g++ and ninja; the set-up script builds them once,
`python -m ds_zo.native`). Optional: where they cannot be built, ds_zo uses its Python paths, which give the same
values. DS_ZO_NATIVE=0 turns them off; DS_ZO_NATIVE_DIR moves the build (default ~/.cache/ds_zo/native)."""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import sys
import threading
import time
from types import ModuleType
from typing import Optional

logger = logging.getLogger(__name__)
_NAME = "ds_zo_chunk_draws"
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE = os.path.join(_HERE, "chunk_draws.cpp")
_HEADERS = [os.path.join(_HERE, name) for name in ("mt19937_normal.h", "z_passes.h")]
# -fopenmp: at::parallel_for is a header-only OpenMP loop; without it the loop runs serially (the process already has
# torch's libgomp loaded, which the extension then shares). -ffp-contract=off: no fused multiply-adds.
# -fvisibility=hidden: only the module's init function is exported (pybind11 marks it), no symbol of ours can clash.
_CFLAGS = ["-O2", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden"]
_BUILD_WAIT_S = 600     # a build takes ~30 s; a process waiting longer for another's build gives up (falls back)
_lock = threading.Lock()
_module: Optional[ModuleType] = None
_unavailable: Optional[str] = None
_fast_gaussian_off: Optional[str] = None


def build_directory() -> str:
    """One directory per source, flags, torch and Python version: a built library there is always the right one."""
    import torch

    text = b""
    for path in [_SOURCE] + _HEADERS:
        with open(path, "rb") as f:
            text += f.read()
    digest = hashlib.sha256(text + repr((_CFLAGS, torch.__version__, sys.version)).encode()).hexdigest()
    root = os.environ.get("DS_ZO_NATIVE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ds_zo", "native")
    return os.path.join(root, f"{_NAME}-{digest[:16]}")


def _import(library: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_NAME, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build() -> ModuleType:
    """Import the library if a build completed, else build it. Builders (ranks, processes) take turns on an flock,
    which the OS releases when a process dies, so a killed build never blocks the next one; the marker file is
    written only after a complete build, so a half-written library is never imported."""
    directory = build_directory()
    library, done = os.path.join(directory, _NAME + ".so"), os.path.join(directory, "complete")
    if os.path.exists(done):
        return _import(library)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "build.flock"), "w") as turn:
        deadline = time.monotonic() + _BUILD_WAIT_S
        while True:
            try:
                fcntl.flock(turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building {directory} for {_BUILD_WAIT_S} s")
                time.sleep(0.2)
        if os.path.exists(done):           # built by whoever held the turn before
            return _import(library)
        # torch's own lock file: only a builder that died can have left it (builders take turns above), and torch's
        # loader would wait for it forever
        stale = os.path.join(directory, "lock")
        if os.path.exists(stale):
            os.remove(stale)
        from torch.utils.cpp_extension import load

        module = load(name=_NAME, sources=[_SOURCE], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                      build_directory=directory, verbose=False)
        open(done, "w").close()
        return module


def chunk_draws() -> Optional[ModuleType]:
    """The compiled chunk sampler (`draw_chunks(outs, keys, scale, gaussian)`), or None where it is unavailable: the
    reason is logged once and kept in `unavailable()`."""
    global _module, _unavailable
    if _module is not None or _unavailable is not None:
        return _module
    with _lock:
        if _module is None and _unavailable is None:
            if os.environ.get("DS_ZO_NATIVE", "1") == "0":
                _unavailable = "turned off (DS_ZO_NATIVE=0)"
            else:
                try:
                    _module = _check_fast_gaussian(_build())
                except Exception as exc:  # no compiler, no ninja, read-only cache: fall back, say why
                    lines = str(exc).strip().splitlines()
                    _unavailable = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
                    logger.warning("ds_zo: native chunk draws unavailable (%s); z chunks are drawn on Python "
                                   "threads instead (same values, less parallel)", _unavailable)
    return _module


def _check_fast_gaussian(module: ModuleType) -> ModuleType:
    """Keep the vectorised Gaussian sampler only if it gives torch's values here: this torch's normal_ kernel, this
    CPU's dispatch (ATEN_CPU_CAPABILITY), this compiler's code. Sizes around the 16-value groups and the 624-word
    twists, several keys and scales; a few milliseconds."""
    global _fast_gaussian_off
    import torch

    if not module.fast_gaussian():
        _fast_gaussian_off = "the CPU lacks AVX2 or FMA"
        return module
    cases = [(n, key, scale) for n in (16, 17, 31, 623, 624, 625, 1263, 4111, 70_001)
             for key, scale in ((0, 1.0), (2**40 + 12_345, 1e-3), (2**63 - 1, 0.37))]
    for n, key, scale in cases:
        got = torch.empty(n, dtype=torch.float32)
        module.draw_chunks([got], [key], scale, True)
        want = torch.empty(n, dtype=torch.float32).normal_(0.0, scale, generator=torch.Generator().manual_seed(key))
        if not torch.equal(got, want):
            module.set_fast_gaussian(False)
            _fast_gaussian_off = (f"it differs from torch's normal_ here (n={n}, key={key}, scale={scale}; torch "
                                  f"{torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()})")
            logger.warning("ds_zo: the vectorised z sampler is off: %s; z chunks use torch's sampler (same values, "
                           "slower)", _fast_gaussian_off)
            break
    return module


def fast_gaussian_off() -> Optional[str]:
    """Why Gaussian z chunks do not come from the vectorised sampler (None while they do, or before the first use)."""
    return _fast_gaussian_off


def unavailable() -> Optional[str]:
    """Why the native helpers are not used (None while they are, or before the first use)."""
    return _unavailable
