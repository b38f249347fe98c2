"""The errors that mean bad input (a config, a path, a layer index), shown as one line."""

from alignkd.align import LayerMapError
from alignkd.assets import AssetError
from alignkd.config import ConfigError
from alignkd.data import DataError
from alignkd.evaluate import EvalError
from alignkd.families import FamilyError
from alignkd.models import ModelError
from alignkd.report import ReportError

USER_ERRORS = (AssetError, ConfigError, DataError, EvalError, FamilyError, LayerMapError, ModelError, ReportError)
