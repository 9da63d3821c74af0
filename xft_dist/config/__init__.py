"""Typed configuration: schema, YAML composition and overrides, and the DeepSpeed config derived from it."""

from .deepspeed import batch_split, check_precision, deepspeed_config
from .errors import ConfigError
from .load import dump_config, load_config
from .schema import Config

__all__ = ["Config", "ConfigError", "load_config", "dump_config", "deepspeed_config", "batch_split",
           "check_precision"]
