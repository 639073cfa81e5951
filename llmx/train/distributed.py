"""Multi-process (multi-host) start-up through JAX's distributed runtime.

Every process runs the same program; `jax.distributed.initialize` connects them, after which
`jax.devices()` lists every process's devices and one mesh spans them all. The coordinator's
address, the number of processes and this one's id come from flags (several processes on one
machine, or any cluster), or JAX finds them itself on a Cloud TPU pod slice, under SLURM and
under Open MPI.
"""
import glob
import importlib.util
import logging
import os

import jax

from llmx.train.config_check import ConfigError

log = logging.getLogger("llmx")

MODES = ("auto", "on", "off")


def detected_cluster() -> str | None:
  """The multi-process launcher this process runs under, or None (a plain single process)."""
  env = os.environ
  if ("SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env
      and int(env.get("SLURM_NTASKS", "1") or 1) > 1):
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env:
    return "openmpi"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("TPU_PROCESS_ADDRESSES", ""):
    return "tpu (gke)"
  if importlib.util.find_spec("libtpu") is not None and (glob.glob("/dev/accel*")
                                                         or glob.glob("/dev/vfio/[0-9]*")):
    return "tpu vm"  # the pod's other workers are found through the TPU metadata
  return None


def initialize(*, coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               mode: str = "auto") -> bool:
  """Connects this process to the others; True if it did. Call before anything touches devices.

  mode: "auto" connects when the flags are given or a cluster is detected; "on" always calls
  jax.distributed.initialize (which detects the rest); "off" never does (one process).
  """
  if mode not in MODES:
    raise ConfigError(f"--distributed={mode!r}: must be one of {', '.join(map(repr, MODES))}")
  explicit = dict(coordinator_address=coordinator_address or None,
                  num_processes=num_processes or None,
                  process_id=process_id if process_id >= 0 else None)
  given = {k: v for k, v in explicit.items() if v is not None}
  if mode == "off":
    if given:
      raise ConfigError(f"--distributed=off contradicts --{', --'.join(given)}")
    return False
  cluster = detected_cluster()
  if given and not cluster and len(given) < 3:
    missing = sorted(set(explicit) - set(given))
    raise ConfigError(f"--{', --'.join(given)} given without --{', --'.join(missing)}: outside a "
                      f"detected cluster all three are needed")
  if num_processes and process_id >= num_processes:
    raise ConfigError(f"--process_id={process_id} is not below --num_processes={num_processes}")
  if mode == "auto" and not given and not cluster:
    return False
  jax.distributed.initialize(**given)
  log.info("process %d of %d (%s), %d local / %d global devices", jax.process_index(),
           jax.process_count(), cluster or "flags", jax.local_device_count(), jax.device_count())
  return True
