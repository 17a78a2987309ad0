"""DistZO2 parallelism: process groups, the DeepSpeed mpu adapter, the communicator, ZeRO-3 partitioning."""
from .dims import ParallelDims
from .communicator import Communicator, CollectiveError

__all__ = ["ParallelDims", "Communicator", "CollectiveError"]
