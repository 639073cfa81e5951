"""Context parallelism in the LM recipe: the same losses as one device, a quarter of the memory.

The full-size check (llama_tiny at sequence length 2048, 20 steps; results/context_parallel.md)
takes minutes on 2 cores: `python -m benchmarks.context_parallel`. Here the same script runs
smaller (sequence 512, 4 steps) in a child process with 8 simulated devices.
"""
import json
import os
import subprocess
import sys

import pytest

from llmx.families.lm import recipe
from llmx.train.config_check import ConfigError
from tests.conftest import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_llama_tiny_context4_matches_context1_with_less_memory(tmp_path, data_dir):
  out = tmp_path / "figures.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = subprocess.run([sys.executable, "-m", "benchmarks.context_parallel", "--seq", "512",
                         "--batch", "2", "--steps", "4", "--contexts", "1,4", "--json", str(out)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  figures = json.loads(out.read_text())
  base, split = figures["1-"], figures["4-ring"]
  for step, (a, b) in enumerate(zip(base["losses"], split["losses"])):
    assert abs(a - b) < 1e-4, (step, a, b)
  assert split["temp_bytes"] <= 0.35 * base["temp_bytes"], proc.stdout


def _config(block_size, context):
  c = load_config("lm.py:llama_tiny")
  c.model.block_size = block_size
  c.mesh.context = context
  return c


def test_context_not_dividing_the_sequence_is_a_config_error():
  recipe.validate(_config(64, 4))  # 2 x 4 divides 64
  with pytest.raises(ConfigError, match=r"model.block_size=60 .* 2 x mesh.context = 8"):
    recipe.validate(_config(60, 4))
  with pytest.raises(ConfigError, match=r"model.block_size=66 .* 2 x mesh.context = 4"):
    recipe.validate(_config(66, 2))
  c = _config(64, 2)
  c.model.context_attention = "ulysses"
  with pytest.raises(ConfigError, match="model.context_attention='ulysses'"):
    recipe.validate(c)
