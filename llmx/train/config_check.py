"""Config errors, raised before anything compiles: each names the field, its value and what is valid."""
from llmx.errors import LlmxError


class ConfigError(LlmxError, ValueError):
  pass


def get_field(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def require_positive(config, *fields: str, allow_zero: bool = False):
  for field in fields:
    value = get_field(config, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
      bound = ">= 0" if allow_zero else "> 0"
      raise ConfigError(f"{field}={value!r}: must be an integer {bound}")


def require_range(config, field: str, low: float, high: float, *, low_open=False, high_open=True):
  value = get_field(config, field)
  ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
  if not ok:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ConfigError(f"{field}={value!r}: must lie in {interval}")


def require_divisible(config, field: str, by_field: str):
  value, by = get_field(config, field), get_field(config, by_field)
  if value % by:
    raise ConfigError(f"{field}={value} is not divisible by {by_field}={by}")


def require_choice(config, field: str, choices):
  value = get_field(config, field)
  if value not in choices:
    raise ConfigError(f"{field}={value!r}: must be one of {', '.join(map(repr, choices))}")
