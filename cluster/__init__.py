"""Model and cluster config, checkpoint reading, the engine (scheduler, executors, workers) and
the user-facing `LLM` / `AsyncLLM`."""

from .engine.cache_plan import CacheConfig
from .config import ClusterConfig, ConfigError, ModelConfig, RebalanceConfig, SpeculativeConfig
from .async_llm import AsyncLLM
from .engine.engine import EngineCore, UnavailableError
from .engine.outputs import RequestOutput
from .llm import LLM, Completion
from .engine.sampling import SamplingParams
from .engine.scheduler import ContextLengthError, OverloadedError, SchedulerConfig

__all__ = [
    "LLM", "AsyncLLM", "CacheConfig", "ClusterConfig", "Completion", "ConfigError", "ContextLengthError",
    "EngineCore", "ModelConfig", "OverloadedError", "RebalanceConfig", "RequestOutput", "SamplingParams",
    "SchedulerConfig", "SpeculativeConfig", "UnavailableError",
]
