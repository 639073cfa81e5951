"""The process settings every entry point applies (llmx/train/launch.py)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

# A worker thread allocates four 24 MiB blocks (more than its arena's first 64 MiB heap holds, so
# the arena grows a second heap), writes them, frees them, six times over; prints the page
# faults of each round.
_ROUNDS = r"""
import ctypes, json, resource, sys, threading
from llmx.train import launch
libc = ctypes.CDLL("libc.so.6")
if sys.argv[1] == "llmx":
  launch.keep_freed_memory()
else:  # the two settings without the top pad
  libc.mallopt(-4, 0); libc.mallopt(-1, -1)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
def rounds():
  for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(24 << 20) for _ in range(4)]
    for b in blocks:
      libc.memset(b, 1, 24 << 20)
    for b in blocks:
      libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(json.dumps(faults))
"""


def _faults_per_round(setting: str) -> list[int]:
  done = subprocess.run([sys.executable, "-c", _ROUNDS, setting], cwd=REPO, capture_output=True,
                        text=True, check=True)
  return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_worker_threads_keep_their_freed_heaps():
  # Without the top pad glibc deletes the emptied second heap each round and the thread faults
  # its 24+ MiB in again (about 12,000 pages a round); with llmx's settings it keeps it.
  without_pad = _faults_per_round("no_pad")
  with_llmx = _faults_per_round("llmx")
  assert min(without_pad[1:]) > 5000, without_pad
  assert max(with_llmx[1:]) < 500, with_llmx
