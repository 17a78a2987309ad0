"""Native helpers, compiled with torch's C++ extension loader (g++ and ninja; the set-up script builds them once,
`python -m ds_zo.native`). Optional: where they cannot be built, ds_zo uses its Python paths, which give the same
values. DS_ZO_NATIVE=0 turns them off; DS_ZO_NATIVE_DIR moves the build (default ~/.cache/ds_zo/native)."""
from __future__ import annotations

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
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chunk_draws.cpp")
# -fopenmp: at::parallel_for is a header-only OpenMP loop; without it the loop runs serially (the process already has
# torch's libgomp loaded, which the extension then shares). -ffp-contract=off: no fused multiply-adds.
_CFLAGS = ["-O2", "-fopenmp", "-ffp-contract=off"]
_STALE_LOCK_S = 600     # a build takes ~30 s: an older lock file is left by a build that was killed
_lock = threading.Lock()
_module: Optional[ModuleType] = None
_unavailable: Optional[str] = None


def build_directory() -> str:
    """One directory per source, flags, torch and Python version: a built library there is always the right one."""
    import torch

    with open(_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + repr((_CFLAGS, torch.__version__, sys.version)).encode()).hexdigest()
    root = os.environ.get("DS_ZO_NATIVE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ds_zo", "native")
    return os.path.join(root, f"{_NAME}-{digest[:16]}")


def _build() -> ModuleType:
    directory = build_directory()
    library = os.path.join(directory, _NAME + ".so")
    if not os.path.exists(library):
        from torch.utils.cpp_extension import load

        os.makedirs(directory, exist_ok=True)
        # torch's loader waits for its lock file forever, even when a killed build left it behind
        lock = os.path.join(directory, "lock")
        if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > _STALE_LOCK_S:
            os.remove(lock)
        return load(name=_NAME, sources=[_SOURCE], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                    build_directory=directory, verbose=False)
    # built already: import it directly (no lock file, no compiler needed)
    spec = importlib.util.spec_from_file_location(_NAME, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
                    _module = _build()
                except Exception as exc:  # no compiler, no ninja, read-only cache: fall back, say why
                    lines = str(exc).strip().splitlines()
                    _unavailable = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
                    logger.warning("ds_zo: native chunk draws unavailable (%s); z chunks are drawn on Python "
                                   "threads instead (same values, less parallel)", _unavailable)
    return _module


def unavailable() -> Optional[str]:
    """Why the native helpers are not used (None while they are, or before the first use)."""
    return _unavailable
