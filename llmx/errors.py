"""Errors a user can fix (a config field, a data file, a checkpoint). Entry points print these as
one line instead of a traceback, and exit with the error's `exit_code`."""


class LlmxError(Exception):
  exit_code = 2  # a usage error: the command as given cannot run


class Preempted(LlmxError):
  """The run was asked to stop (SIGTERM: a preempted pod worker), saved its state and stopped.

  Exit status 143 (128 + SIGTERM, what a shell reports for a job killed by SIGTERM) tells a
  scheduler that the job did not finish and should be started again; re-running the same
  command resumes from the saved step."""
  exit_code = 143
