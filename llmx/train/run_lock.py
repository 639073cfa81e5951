"""One writer per run folder: `DIR/.llmx.lock` names the process training there.

A second trainer on the same folder would interleave checkpoints and metrics with the first, so
it stops at once with the holder's pid, host and start time. A lock left by a process that no
longer runs (killed with SIGKILL, a crashed host) on this host is detected and taken over; one
from another host is reported with how to remove it. With several processes only process 0
holds the lock (they share the folder).
"""
import contextlib
import datetime
import json
import logging
import os
import pathlib
import socket

import jax

from llmx.errors import LlmxError

log = logging.getLogger("llmx")
LOCK_NAME = ".llmx.lock"


class RunFolderBusy(LlmxError, RuntimeError):
  pass


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _holder(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}  # garbage (or a lock caught mid-write): treated as stale


def acquire(workdir: str | pathlib.Path) -> pathlib.Path:
  """Creates the lock file or raises RunFolderBusy; -> its path."""
  path = pathlib.Path(workdir) / LOCK_NAME
  me = dict(pid=os.getpid(), host=socket.gethostname(),
            started=datetime.datetime.now().isoformat(timespec="seconds"))
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _holder(path)
      same_host = holder.get("host") == me["host"]
      if holder and not (same_host and not _alive(int(holder.get("pid", -1)))):
        where = "this host" if same_host else f"host {holder.get('host')}"
        raise RunFolderBusy(
            f"--workdir={workdir} is in use by process {holder.get('pid')} on {where} (since "
            f"{holder.get('started')}); stop that run or use another --workdir. If that process "
            f"is gone, delete {path}") from None
      log.warning("taking over %s: its process %s on this host is gone", path, holder.get("pid"))
      path.unlink(missing_ok=True)
      continue
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return path
  raise RunFolderBusy(f"--workdir={workdir}: could not create {path}; another run may be "
                      f"starting there")


@contextlib.contextmanager
def held(workdir: str | pathlib.Path):
  """The lock, for the duration of the block (process 0 only; the others share its folder)."""
  path = acquire(workdir) if jax.process_index() == 0 else None
  try:
    yield
  finally:
    if path is not None:
      holder = _holder(path)
      if holder.get("pid") == os.getpid():
        path.unlink(missing_ok=True)
