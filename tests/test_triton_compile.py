"""ds_zo's Triton kernels compile for a GPU (sm_90) on this machine, GPU or not: tests/compile_sm90.py in a fresh
process with Triton's interpreter off. CI has no GPU, and the CPU tests run the kernels in the interpreter, which
accepts code the compiler refuses."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and os.path.exists(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia",
                                                            "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas(), reason="needs Triton with its bundled ptxas")
@pytest.mark.timeout(600)
def test_the_kernels_compile_for_sm90_without_contraction():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "compile_sm90.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    lines = [line for line in run.stdout.splitlines() if "bytes" in line]
    assert len(lines) == 12, run.stdout
