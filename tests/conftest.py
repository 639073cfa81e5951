import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Shared public data sets (Tiny Shakespeare, SST-2, Tatoeba) live beside the repo, outside git.
os.environ.setdefault("LLMX_DATA_DIR", str(REPO.parent / "shared" / "data"))


@pytest.fixture
def data_dir() -> pathlib.Path:
  path = pathlib.Path(os.environ["LLMX_DATA_DIR"])
  if not (path / "tinyshakespeare.txt").is_file():
    pytest.fail(f"LLMX_DATA_DIR={path} does not hold tinyshakespeare.txt (see shared/data/README.md)")
  return path


def cli(*args, check=True) -> subprocess.CompletedProcess:
  """Runs `python -m *args` from the repo on CPU; with check, a non-zero exit fails the test with
  the end of its output."""
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if check and proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def load_config(spec: str):
  """`FILE.py[:variant]` under experiments/configs -> its ConfigDict, loaded by path (tests never
  import the experiments package)."""
  import importlib.util
  name, _, variant = spec.partition(":")
  path = REPO / "experiments" / "configs" / name
  module_spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def adamw(learning_rate):
  """The LM configs' optimizer (AdamW, b2 0.95, weight decay 0.1, clipping at 1) for tests that
  build a Trainable by hand."""
  from llmx.train import optimizers
  return optimizers.optimizer("adamw", learning_rate, b2=0.95, weight_decay=0.1, grad_clip=1.0)
