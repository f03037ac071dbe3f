"""Model config, checkpoint reading, the model runner and the engine (`LLM`)."""

from .config import ClusterConfig, ConfigError, ModelConfig
from .llm import LLM, Completion
from .sampling import SamplingParams

__all__ = ["LLM", "ClusterConfig", "Completion", "ConfigError", "ModelConfig", "SamplingParams"]
