from opd.config.loader import ConfigError, check_resources, from_yaml, load_config, to_yaml
from opd.config.schema import Config

__all__ = ["Config", "ConfigError", "check_resources", "from_yaml", "load_config", "to_yaml"]
