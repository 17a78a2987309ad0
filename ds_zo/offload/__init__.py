"""ZO2-style offloading: CPU parameter store and the upload / compute / offload pipeline."""
from .pipeline import OffloadPipeline
from .store import ParameterStore

__all__ = ["OffloadPipeline", "ParameterStore"]
