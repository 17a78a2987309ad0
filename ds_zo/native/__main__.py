"""`python -m ds_zo.native`: build (or find) the native helpers now, so no training step waits for the compiler."""
import sys

from . import chunk_draws, fast_gaussian_off, unavailable

if chunk_draws() is None:
    print(f"[ds_zo.native] not built: {unavailable()} (ds_zo still works; z chunks are drawn on Python threads)")
    sys.exit(0)
off = fast_gaussian_off()
print("[ds_zo.native] ok" + (f"; vectorised Gaussian sampler off: {off}" if off else "; vectorised Gaussian sampler on"))
