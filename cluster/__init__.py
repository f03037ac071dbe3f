"""Model and cluster config, checkpoint reading, the engine (scheduler, executors, workers) and
the user-facing `LLM` / `AsyncLLM`."""

from .cache_plan import CacheConfig
from .config import ClusterConfig, ConfigError, ModelConfig, RebalanceConfig
from .async_llm import AsyncLLM
from .engine import EngineCore, RequestOutput
from .llm import LLM, Completion
from .sampling import SamplingParams
from .scheduler import ContextLengthError, OverloadedError, SchedulerConfig

__all__ = [
    "LLM", "AsyncLLM", "CacheConfig", "ClusterConfig", "Completion", "ConfigError", "ContextLengthError",
    "EngineCore", "ModelConfig", "OverloadedError", "RebalanceConfig", "RequestOutput", "SamplingParams",
    "SchedulerConfig",
]
