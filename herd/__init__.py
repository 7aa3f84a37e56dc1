"""herd: an open toolkit for the Llama family of language models."""

from herd.config import PRESETS, ModelConfig, RopeScaling
from herd.errors import ConfigError, FormatError, GenerationError, HerdError, ModelNotFoundError, TokenizerError

__version__ = "0.1.0"


def load(path=None, dtype=None, **kwargs):
    """Load a checkpoint (folder, GGUF file or catalog name; None = the default model) into an LLM."""
    from herd.api import load as _load

    return _load(path, dtype, **kwargs)


__all__ = ["load", "PRESETS", "ModelConfig", "RopeScaling", "HerdError", "ConfigError", "FormatError",
           "GenerationError", "ModelNotFoundError", "TokenizerError", "__version__"]
