"""Experiment entry points (`python -m experiments.NAME`) and their configs."""
import ctypes
import os
import sys


def _keep_freed_memory():
  """XLA:CPU allocates its scratch buffer every step and glibc hands it back to the OS each time
  (thousands of page faults a step). Keeping freed memory in the process cut a small train step
  from 65 to 48 ms on 2 cores (shared/FACTS.md). Must run before jax allocates anything."""
  if not sys.platform.startswith("linux") or os.environ.get("LLMX_KEEP_MALLOC_DEFAULTS"):
    return
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return
  M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
  libc.mallopt(M_MMAP_MAX, 0)
  libc.mallopt(M_TRIM_THRESHOLD, -1)


_keep_freed_memory()


def setup_logging():
  """Progress lines from llmx at INFO; library chatter (orbax logs every save) at WARNING."""
  import logging
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  llmx_log = logging.getLogger("llmx")
  if not llmx_log.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    llmx_log.addHandler(handler)
  llmx_log.setLevel(logging.INFO)
  llmx_log.propagate = False


def run(main):
  """absl's app.run, with errors a user can fix printed as one line and exit status 2."""
  from absl import app
  from llmx.errors import LlmxError

  def checked_main(argv):
    try:
      return main(argv)
    except LlmxError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(checked_main)
