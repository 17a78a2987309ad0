"""A process that saves a good checkpoint, then is SIGKILLed in the middle of its next save (test helper)."""
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import ds_zo  # noqa: E402
import ds_zo.checkpoint as checkpoint  # noqa: E402
from conftest import ds_config  # noqa: E402
from models import batch, tiny_model  # noqa: E402

out, stage = sys.argv[1], sys.argv[2]     # stage: where the second save dies
engine, *_ = ds_zo.initialize(model=tiny_model("llama", tied=False), config=ds_config(seed=3))
engine.train_batch(batch(seed=0))
engine.save_checkpoint(out)                # global_step1: complete
engine.train_batch(batch(seed=1))
real = checkpoint._write_atomic


def dying_write(path, data):
    if stage == "state" or (stage == "latest" and path.endswith("latest")):
        if stage == "latest":
            with open(f"{path}.tmp{os.getpid()}", "wb") as f:   # half-written temporary file
                f.write(data[:3])
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)


checkpoint._write_atomic = dying_write
engine.save_checkpoint(out)                # global_step2: killed part-way
