"""ParallelDims: the (dp, pertp) grid of ranks and the partition groups, validated, with their process groups.

Rank layout: rank = dp_rank * pertp + pert_rank, so the ranks of one perturbation-parallel group are neighbours (on
one node). Partition groups (ZeRO-3 reslicing) are blocks of `partition` consecutive ranks, by default one node.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional


from ..config import ConfigError


class ParallelConfigError(ConfigError):
    pass


@dataclass
class ParallelDims:
    world: int
    rank: int
    pertp: int = 1
    partition: int = 1          # partition group size (1: every rank holds whole units)
    groups: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.pertp not in (1, 2):
            raise ParallelConfigError(f"zero_order.perturbation_parallel: {self.pertp} is not allowed; use 1 or 2")
        if self.world % self.pertp:
            raise ParallelConfigError(f"zero_order.perturbation_parallel: {self.pertp} does not divide the world size "
                                      f"{self.world}")
        if self.partition < 1 or self.world % self.partition:
            raise ParallelConfigError(f"zero_order.partition_group_size: {self.partition} does not divide the world "
                                      f"size {self.world}")

    @property
    def dp(self) -> int:
        return self.world // self.pertp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.pertp

    @property
    def pert_rank(self) -> int:
        return self.rank % self.pertp

    @property
    def partition_rank(self) -> int:
        return self.rank % self.partition

    def pertp_ranks(self, dp_rank: int) -> list[int]:
        return [dp_rank * self.pertp + r for r in range(self.pertp)]

    def dp_ranks(self, pert_rank: int) -> list[int]:
        return [d * self.pertp + pert_rank for d in range(self.dp)]

    def partition_ranks(self, block: int) -> list[int]:
        return list(range(block * self.partition, (block + 1) * self.partition))

    def build_groups(self, timeout_s: float) -> None:
        """Create every group (all ranks must call this, in the same order). Collectives on them time out."""
        import torch.distributed as dist
        timeout = timedelta(seconds=timeout_s)
        self.groups["world"] = dist.new_group(list(range(self.world)), timeout=timeout)
        for d in range(self.dp):
            g = dist.new_group(self.pertp_ranks(d), timeout=timeout)
            if d == self.dp_rank:
                self.groups["pertp"] = g
        for r in range(self.pertp):
            g = dist.new_group(self.dp_ranks(r), timeout=timeout)
            if r == self.pert_rank:
                self.groups["dp"] = g
        for b in range(self.world // self.partition):
            g = dist.new_group(self.partition_ranks(b), timeout=timeout)
            if self.rank in self.partition_ranks(b):
                self.groups["partition"] = g


def default_partition_size(world: int, requested: Optional[int]) -> int:
    """zero_order.partition_group_size, or the ranks of one node (LOCAL_WORLD_SIZE), or the world."""
    if requested is not None:
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if local is not None and int(local) % requested and requested <= int(local):
            raise ParallelConfigError(f"zero_order.partition_group_size: {requested} does not divide the ranks of a "
                                      f"node (LOCAL_WORLD_SIZE={local})")
        return requested
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return int(local) if local is not None and world % int(local) == 0 else world
