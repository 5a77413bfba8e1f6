"""Layered configuration: YAML files and CLI overrides -> one validated, explained config."""

from ava.config.batch import BatchPlan, WorldSize
from ava.config.deepspeed_json import build_deepspeed_config
from ava.config.errors import ConfigError, Notice, Problem
from ava.config.loader import ConfigFiles, ResolvedConfig, load_config, shipped_configs_dir
from ava.config.schema import AvaConfig

__all__ = [
    "AvaConfig", "BatchPlan", "ConfigError", "ConfigFiles", "Notice", "Problem", "ResolvedConfig",
    "WorldSize", "build_deepspeed_config", "load_config", "shipped_configs_dir",
]
