"""What every entry point does around its main: process settings, logging, joining a
multi-process run, and user errors printed as one line. Nothing happens on import: `run(main)`
does it all, from an entry point's `if __name__ == "__main__":`."""
import ctypes
import os
import re
import sys


def keep_freed_memory():
  """XLA:CPU allocates its scratch buffer every step and glibc hands it back to the OS each time
  (thousands of page faults a step). Keeping freed memory in the process cut a small train step
  from 65 to 48 ms on 2 cores (shared/FACTS.md). Runs before jax computes anything.

  Three settings: no mmap for large blocks (each free would unmap them), no trimming of the main
  heap, and a top pad of 64 MiB. The pad is what keeps the 64 MiB heaps of the other threads'
  arenas: glibc deletes an emptied per-thread heap unless the pad is at least a heap's size
  (`heap_trim`), and XLA's worker threads then fault the memory in again. With JAX 0.10 that
  came and went between runs: 3,600 page faults and 10 ms of system time per nanogpt_baby step
  (38 ms instead of 26-30) in the runs where it happened, none with the pad."""
  if not sys.platform.startswith("linux") or os.environ.get("LLMX_KEEP_MALLOC_DEFAULTS"):
    return
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return
  M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
  libc.mallopt(M_MMAP_MAX, 0)
  libc.mallopt(M_TRIM_THRESHOLD, -1)
  libc.mallopt(M_TOP_PAD, 64 << 20)


def setup_logging():
  """Progress lines from llmx at INFO; library chatter (orbax logs every save) at WARNING."""
  import logging

  import jax
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  llmx_log = logging.getLogger("llmx")
  if not llmx_log.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    llmx_log.addHandler(handler)
  # One voice per run: the other processes of a multi-host job report only warnings and errors.
  llmx_log.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  llmx_log.propagate = False


def _define_distributed_flags():
  from absl import flags
  if "coordinator_address" in flags.FLAGS:
    return
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for a multi-process "
                      "run; empty: detected on TPU pods, SLURM and Open MPI, else one process.")
  flags.DEFINE_integer("num_processes", 0, "Processes in the run (with --coordinator_address).")
  flags.DEFINE_integer("process_id", -1, "This process's index, 0..num_processes-1.")
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "auto: join a multi-process run when the flags above are given or a cluster "
                    "is detected; on: always call jax.distributed.initialize(); off: never.")


def parse_flags(argv):
  """absl's flag parsing, with a bad `--config.*` override (a misspelt field, a value of the
  wrong type) reported as one line and exit status 2 instead of a traceback from inside
  ml_collections."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # absl's own: unknown flag, missing --workdir, ...
    print(f"error: {e}", file=sys.stderr, flush=True)
    print(f"Try --helpfull to list the flags of {argv[0]}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    # ml_collections' message is the repr of a KeyError: "'\\'setps\\'\\nDid you mean ...'".
    message = str(e).replace("\\'", "'").replace("\\n", " ").replace("\n", " ").strip("'\" ")
    if isinstance(e, (AttributeError, KeyError)):
      field = re.match(r"\W*(\w+)", message)
      hint = re.search(r"Did you mean \"(\w+)\"", message)
      message = (f"the config has no field {field.group(1)!r}" if field else message) + (
          f"; did you mean {hint.group(1)!r}?" if hint else "")
    print(f"error: {' '.join(bad) or 'the --config file'}: {' '.join(message.split())}",
          file=sys.stderr, flush=True)
    sys.exit(2)


def run(main, *, distributed: bool = True):
  """absl's app.run(main) after the process settings, with errors a user can fix (LlmxError)
  printed as one line and the error's exit status (2 for a usage error, 143 for a preempted and
  saved run). distributed: join the multi-process run the flags (or the cluster) describe before
  main; read-only tools that run alone pass False."""
  from absl import app, flags

  from llmx.errors import LlmxError, Preempted
  keep_freed_memory()
  if distributed:
    _define_distributed_flags()

  def checked_main(argv):
    try:
      if distributed:
        from llmx.train import distributed as dist
        f = flags.FLAGS
        dist.initialize(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                        process_id=f.process_id, mode=f.distributed)
      setup_logging()
      return main(argv)
    except Preempted as e:
      print(f"preempted: {e}", file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    except LlmxError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(e.exit_code)

  app.run(checked_main, flags_parser=parse_flags)
