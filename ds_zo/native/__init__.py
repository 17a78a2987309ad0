"""Native helpers, compiled on first use with torch's C++ extension loader (g++ and ninja; the set-up script builds
them once, `python -m ds_zo.native`). Optional: where they cannot be built, ds_zo uses its Python paths, which give
the same values. DS_ZO_NATIVE=0 turns them off."""
from __future__ import annotations

import logging
import os
import threading
from types import ModuleType
from typing import Optional

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_module: Optional[ModuleType] = None
_unavailable: Optional[str] = None


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chunk_draws.cpp")
    # -fopenmp: at::parallel_for is a header-only OpenMP loop; without it the loop runs serially. The process already
    # has torch's libgomp loaded, which the extension then shares. -ffp-contract=off: no fused multiply-adds.
    return load(name="ds_zo_chunk_draws", sources=[source], extra_cflags=["-O2", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"], verbose=False)


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
                    _unavailable = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"
                    logger.warning("ds_zo: native chunk draws unavailable (%s); z chunks are drawn on Python "
                                   "threads instead (same values, less parallel)", _unavailable)
    return _module


def unavailable() -> Optional[str]:
    """Why the native helpers are not used (None while they are, or before the first use)."""
    return _unavailable
