"""Typed errors. Each says what was expected, what was found, and where (file, key, tensor, line)."""


class HerdError(Exception):
    """Base class of every error herd raises on purpose."""


class ConfigError(HerdError, ValueError):
    """A model configuration is impossible or has keys herd does not know."""


class FormatError(HerdError, ValueError):
    """A checkpoint, tokenizer or data file is missing, truncated, corrupt or of an unknown kind."""


class TokenizerError(HerdError, ValueError):
    """A tokenizer file cannot be read or a text cannot be encoded."""


class GenerationError(HerdError, ValueError):
    """A generation request is impossible (prompt longer than the context, bad sampling settings)."""


class ModelNotFoundError(HerdError, FileNotFoundError):
    """A model name or path does not resolve to a checkpoint."""
