"""The errors that mean bad input (a config, a path, a layer index), shown as one line."""

from alignkd.align import LayerMapError
from alignkd.config import ConfigError
from alignkd.data import DataError
from alignkd.families import FamilyError
from alignkd.models import ModelError

USER_ERRORS = (ConfigError, DataError, FamilyError, LayerMapError, ModelError)
