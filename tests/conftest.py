import os
import sys

import torch  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
# without a GPU, Triton kernels (ds_zo.triton_z, the counter-based z sampler) run in Triton's interpreter; read when a
# kernel is defined, so set before anything imports ds_zo.triton_z
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


def ds_config(lr=1e-2, eps=1e-3, wd=0.0, micro=2, **zero_order):
    cfg = {"train_micro_batch_size_per_gpu": micro,
           "optimizer": {"type": "ZOSGD", "params": {"lr": lr, "eps": eps, "weight_decay": wd}}}
    if zero_order:
        cfg["zero_order"] = zero_order
    return cfg


@pytest.fixture
def make_config():
    return ds_config
