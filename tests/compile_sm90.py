"""Compile ds_zo's Triton kernels for sm_90 without a GPU (Triton's own ptxas), in a process where Triton's
interpreter is off: the interpreter runs kernels as Python and accepts code the compiler refuses (a non-constexpr
global in a kernel was found so). Prints one line per variant; exits non-zero on the first failure. Run by
tests/test_triton_compile.py."""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
import triton                                                   # noqa: E402
from triton.backends.compiler import GPUTarget                  # noqa: E402
from triton.compiler import ASTSource                           # noqa: E402

from ds_zo import triton_passes, triton_z                       # noqa: E402

assert not triton_z.INTERPRETED
TARGET = GPUTarget("cuda", 90, 32)
OPTIONS = triton_z.LAUNCH_OPTIONS             # as the kernels are compiled when launched
POINTER = {0: "*fp32", 1: "*bf16", 2: "*fp16"}


def compile_one(fn, signature: dict, constexprs: dict) -> str:
    signature = dict(signature, **{k: "constexpr" for k in constexprs})
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                            options=OPTIONS)
    ptx = kernel.asm["ptx"]
    if "fma.rn.f32" in ptx:        # contraction would change the rounding the exactness invariants rest on
        raise SystemExit(f"{fn.__name__} {constexprs}: fused multiply-add in the PTX")
    return f"{fn.__name__} {constexprs}: {len(kernel.asm['cubin'])} bytes"


print(compile_one(triton_z._fill, {"out_ptr": "*fp32", "n": "i64", "start": "i64", "key": "i64", "scale": "fp32"},
                  {"GAUSSIAN": True, "QUADS": triton_z.QUADS}))
# every storage dtype, one and two targets, 1 to MAX_Q perturbations, the smallest and largest tables, both
# distributions, both divisions
for kind, targets, q, segs, reciprocal in ((0, 2, 1, 16, True), (1, 2, 2, 32, True), (2, 1, 3, 256, False),
                                           (1, 1, triton_passes.MAX_Q, triton_passes.MAX_SEGS, True)):
    ptr = POINTER[kind]
    print(compile_one(triton_passes._perturb_kernel,
                      {"master_ptr": ptr, "out0_ptr": ptr, "out1_ptr": ptr, "tab_ptr": "*i64", "eps": "fp32"},
                      {"TARGETS": targets, "KIND": kind, "SEGS": segs, "GAUSSIAN": kind != 2,
                       "QUADS": triton_passes.QUADS}))
    print(compile_one(triton_passes._update_kernel,
                      {"theta_ptr": ptr, "tab_ptr": "*i64", "lr": "fp32", "wd": "fp32", "inv_q": "fp32"},
                      {"Q": q, "RECIPROCAL": reciprocal, "KIND": kind, "SEGS": segs, "GAUSSIAN": kind != 2,
                       "QUADS": triton_passes.QUADS}))
# the rows kernel: listed rows and one range, one and two targets, small ints as Triton types them (i32) and large
for kind, listed, targets, small in ((1, True, 2, "i32"), (0, False, 1, "i64"), (2, True, 1, "i32")):
    ptr = POINTER[kind]
    print(compile_one(triton_passes._perturb_rows_kernel,
                      {"master_ptr": ptr, "out0_ptr": ptr, "out1_ptr": ptr, "rows_ptr": "*i64", "length": small,
                       "start": small, "key": "i64", "eps": "fp32", "sign0": "i32", "sign1": "i32",
                       "per_row": small},
                      {"LISTED": listed, "TARGETS": targets, "KIND": kind, "GAUSSIAN": kind != 2,
                       "QUADS": triton_passes.QUADS}))
sys.exit(0)
