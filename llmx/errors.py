"""Errors a user can fix (a config field, a data file, a checkpoint). Entry points print these as
one line instead of a traceback."""


class LlmxError(Exception):
  pass
