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
  # One voice per run: the other processes of a multi-host job report only warnings and errors.
  import jax
  llmx_log.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  llmx_log.propagate = False


def _define_distributed_flags():
  from absl import flags
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for a multi-process "
                      "run; empty: detected on TPU pods, SLURM and Open MPI, else one process.")
  flags.DEFINE_integer("num_processes", 0, "Processes in the run (with --coordinator_address).")
  flags.DEFINE_integer("process_id", -1, "This process's index, 0..num_processes-1.")
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "auto: join a multi-process run when the flags above are given or a cluster "
                    "is detected; on: always call jax.distributed.initialize(); off: never.")


_define_distributed_flags()


def setup_distributed():
  """Joins the multi-process run the flags (or the cluster) describe; every entry point that uses
  `run` gets this before its main."""
  from absl import flags
  from llmx.train import distributed
  f = flags.FLAGS
  distributed.initialize(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                         process_id=f.process_id, mode=f.distributed)


def run(main):
  """absl's app.run, with errors a user can fix printed as one line and exit status 2, after
  joining the multi-process run if there is one."""
  from absl import app
  from llmx.errors import LlmxError

  def checked_main(argv):
    try:
      setup_distributed()
      return main(argv)
    except LlmxError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(checked_main)
