"""`python -m ds_zo.native`: build (or find) the native helpers now, so no training step waits for the compiler."""
import sys

from . import chunk_draws, unavailable

if chunk_draws() is None:
    print(f"[ds_zo.native] not built: {unavailable()} (ds_zo still works; z chunks are drawn on Python threads)")
    sys.exit(0)
print("[ds_zo.native] ok")
