"""One job per output folder: rank 0 holds an exclusive lock on OUTPUT_DIR/.ds_zo-job.lock while the job runs.

Two jobs writing one folder (a scheduler requeueing a job whose first run still runs, the same command started twice)
delete each other's half-written checkpoints and interleave their step logs and monitor files. The lock is the kernel's
(flock): it ends with the process however that ends, so a killed job never leaves the folder locked.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
import time

from .checkpoint import CheckpointError

LOCK_FILE = ".ds_zo-job.lock"


class OutputDirError(CheckpointError):
    pass


class OutputDirInUse(OutputDirError):
    pass


def check_writable(folder: str) -> None:
    """Create the folder if needed and write a file there: a folder that cannot be written failed late, with a
    traceback from DeepSpeed's monitor set-up, once the model had loaded."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise OutputDirError(f"--output_dir {folder!r}: cannot write there ({e.strerror or e})") from None


@contextlib.contextmanager
def output_dir_lock(folder: str, hold: bool = True):
    """Check that the folder can be written, and hold its lock for the `with` block (hold=False, on ranks other than
    0: no lock). A folder already locked is refused, naming the job that holds it; a file system without locks
    (some network mounts) is used without one. The lock is as good as the file system's flock: NFS mounted without
    locking, or Lustre with node-local locks, lock within one node only."""
    check_writable(folder)
    if not hold:
        yield
        return
    path = os.path.join(folder, LOCK_FILE)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise OutputDirError(f"--output_dir {folder!r}: cannot open its job lock {path!r} ({e.strerror or e}); "
                             "another user's job folder?") from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            raise OutputDirInUse(f"--output_dir {os.path.abspath(folder)!r} is in use by another job ({holder}): two "
                                 "jobs there would delete each other's checkpoints and mix their logs; wait for it "
                                 "to end, stop it, or use another --output_dir") from None
        except OSError:
            pass                # no locks on this file system: nothing to hold
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        f.close()               # releases the lock
