"""ds_zo: zeroth-order (MeZO / ZO2 / DistZO2) fine-tuning of LLMs as a DeepSpeed optimizer backend."""
from .config import ConfigError, ZeroOrderConfig, ZOSGDParams
from .initialize import initialize
from .optimizer import ZOSGD, StepRecord
from .perturb import PerturbationGenerator
from . import registry

registry.register()

__all__ = ["initialize", "ZOSGD", "StepRecord", "PerturbationGenerator", "ConfigError", "ZeroOrderConfig",
           "ZOSGDParams", "registry"]
__version__ = "0.1.0"
