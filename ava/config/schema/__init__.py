"""The validated configuration: one pydantic model per section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ava.config.schema.base import Section, WholeNumber
from ava.config.schema.compatibility import COMPATIBILITY_ONLY, compatibility_warnings
from ava.config.schema.data import DataConfig
from ava.config.schema.deepspeed import DeepSpeedSection, OptimizerConfig, OptimizerParams
from ava.config.schema.hardware import HardwareConfig
from ava.config.schema.model import ModelConfig
from ava.config.schema.quantization import QuantizationConfig
from ava.config.schema.rlhf import RLHFConfig
from ava.config.schema.training import GradientHealthConfig, Precision, TrainingConfig


class AvaConfig(BaseModel):
    """The whole configuration: what every later stage receives."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    rlhf: RLHFConfig | None = Field(None, description="Present when an RLHF config is given.")


SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "deepspeed": DeepSpeedSection,
    "hardware": HardwareConfig,
    "quantization": QuantizationConfig,
    "rlhf": RLHFConfig,
}

__all__ = [
    "AvaConfig", "SECTIONS", "COMPATIBILITY_ONLY", "compatibility_warnings", "Section", "WholeNumber",
    "ModelConfig", "TrainingConfig", "GradientHealthConfig", "DataConfig", "DeepSpeedSection",
    "OptimizerConfig", "OptimizerParams", "HardwareConfig", "RLHFConfig", "Precision",
    "QuantizationConfig",
]
