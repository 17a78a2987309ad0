"""The model-parallel-unit object DeepSpeed accepts (`mpu=`), describing ds_zo's grid to DeepSpeed.

Data parallel = ranks that see different shards of the global batch (dp = world / pertp), so DeepSpeed's batch-size
arithmetic (train_batch_size = micro * GAS * dp) and its dataloader sharding mean what they always mean. The
perturbation-parallel peers, which see the same data, are DeepSpeed's "model parallel" group.
"""
from __future__ import annotations

import torch.distributed as dist

from .dims import ParallelDims


class ZOParallelMPU:
    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_data_parallel_group(self):
        return self.dims.groups["dp"]

    def get_data_parallel_rank(self) -> int:
        return self.dims.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.dims.dp_ranks(self.dims.pert_rank)

    def get_model_parallel_group(self):
        return self.dims.groups["pertp"]

    def get_model_parallel_rank(self) -> int:
        return self.dims.pert_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.pertp

    def get_model_parallel_src_rank(self) -> int:
        return self.dims.pertp_ranks(self.dims.dp_rank)[0]

    # DeepSpeed asks for these names too (Megatron's newer spelling)
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_global_rank(self) -> int:
        return dist.get_rank()
