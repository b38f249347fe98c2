"""The run config: typed dataclasses (``schema``), YAML loading and overrides (``load``), cross-field checks
(``validate``).

Errors are ``ConfigError`` with one line that names the field and the fix.
"""

from alignkd.config.load import apply_override, field_docs, from_dict, load_config, section_defaults, to_dict
from alignkd.config.resolve import resolve, resolve_precision, resolved
from alignkd.config.schema import (
    Config,
    DataConfig,
    FromTeacherConfig,
    GenerationConfig,
    ModelConfig,
    PeftSettings,
    StudentConfig,
    TrainConfig,
    WeightingConfig,
)
from alignkd.config.validate import OPTIMIZERS, SOURCES, validate
from alignkd.errors import ConfigError
from alignkd.terms import ScheduleConfig, TermConfig

__all__ = [
    "OPTIMIZERS",
    "SOURCES",
    "Config",
    "ConfigError",
    "DataConfig",
    "FromTeacherConfig",
    "PeftSettings",
    "GenerationConfig",
    "ModelConfig",
    "ScheduleConfig",
    "StudentConfig",
    "TermConfig",
    "TrainConfig",
    "WeightingConfig",
    "apply_override",
    "field_docs",
    "from_dict",
    "load_config",
    "section_defaults",
    "to_dict",
    "resolve",
    "resolve_precision",
    "resolved",
    "validate",
]
