import os
import pathlib

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
