"""Model config, checkpoint reading, the model runner and the engine (`LLM`)."""

from .config import ConfigError, ModelConfig
from .llm import LLM, Completion
from .sampling import SamplingParams

__all__ = ["LLM", "Completion", "ConfigError", "ModelConfig", "SamplingParams"]
