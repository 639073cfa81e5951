"""Two processes x 4 CPU devices (jax.distributed on localhost) against one process x 8 devices.

Both train the LM experiment for 20 steps on a data 2 x fsdp 4 mesh and checkpoint; the
two-process run must give the same losses (within 1e-6) and parameters (within 1e-5: collectives
sum in another order across processes), with each process loading only its half of every batch,
only process 0 logging and sampling, and one data-iterator state per process.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from llmx.families.lm import recipe as lm_recipe
from llmx.train import distributed
from llmx.train.config_check import ConfigError
from tests.conftest import REPO


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def lm_command(workdir, data_dir, *extra):
  return [sys.executable, "-m", "experiments.pretrain_lm", "--config=experiments/configs/lm.py:smoke",
          f"--workdir={workdir}", f"--config.data.path={data_dir / 'tinyshakespeare.txt'}",
          "--config.model.n_layer=1", "--config.model.d_model=32", "--config.model.block_size=16",
          "--config.train.batch_size=8", "--config.train.steps=20", "--config.train.log_every=1",
          "--config.train.eval_every=10", "--config.train.checkpoint_every=10",
          "--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.sample.max_new_tokens=8",
          *extra]


def env_with_devices(n: int) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def finish(proc, name):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
  return out


def params_of(workdir):
  model, _, _, step = lm_recipe.load_run(str(workdir))
  from flax import nnx
  return step, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def losses_of(workdir):
  return {l["step"]: l["train_loss"] for l in map(json.loads, open(workdir / "metrics.jsonl"))}


def test_two_processes_equal_one_process_with_the_same_devices(tmp_path, data_dir):
  port = free_port()
  single, multi = tmp_path / "one_process", tmp_path / "two_processes"
  procs = [subprocess.Popen(lm_command(single, data_dir, "--config.sample.max_new_tokens=0"),
                            cwd=REPO, text=True,
                            env=env_with_devices(8),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
  for i in range(2):
    procs.append(subprocess.Popen(
        lm_command(multi, data_dir, f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={i}"),
        cwd=REPO, text=True, env=env_with_devices(4),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  out_single, out0, out1 = (finish(p, n) for p, n in zip(procs, ("1 process", "process 0", "process 1")))

  assert "8 devices in 1 processes" in out_single
  assert "8 devices in 2 processes" in out0 and "mesh {'data': 2, 'fsdp': 4, 'expert': 1, 'context': 1, 'tensor': 1}" in out0
  # Coordinated output: process 1 neither logs progress nor samples; process 0 samples once.
  assert "step 20 |" in out0 and "step" not in out1 and "--- sample" not in out1
  assert out0.count("--- sample after step 20 ---") == 1
  data_files = sorted(p.name for p in (multi / "checkpoints" / "20" / "data").glob("*.json"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]

  one, two = losses_of(single), losses_of(multi)
  assert sorted(one) == sorted(two) == list(range(1, 21))
  diff = max(abs(one[s] - two[s]) for s in one)
  print(f"\n2 processes x 4 devices vs 1 process x 8 devices: 20 losses, max difference {diff:.3g}; "
        f"final loss {two[20]:.6f}")
  assert diff <= 1e-6
  (step_a, a), (step_b, b) = params_of(single), params_of(multi)
  assert step_a == step_b == 20
  worst = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
  print(f"final parameters: max |difference| {worst:.3g}")
  # Not bitwise: gloo's cross-process all-reduce sums in another order than the in-process one,
  # and Adam's 1/sqrt(v) amplifies that on near-zero gradients (FACTS.md).
  assert worst <= 1e-5


CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri",
                "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


@pytest.fixture
def no_cluster(monkeypatch):
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)  # no libtpu
  return monkeypatch


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="maybe"), r"--distributed='maybe': must be one of 'auto', 'on', 'off'"),
    (dict(coordinator_address="10.0.0.1:1234"),
     r"--coordinator_address given without --num_processes, --process_id"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2),
     r"--process_id=2 is not below --num_processes=2"),
    (dict(mode="off", num_processes=2), r"--distributed=off contradicts --num_processes"),
])
def test_bad_distributed_flags_are_named(no_cluster, kwargs, message):
  with pytest.raises(ConfigError, match=message):
    distributed.initialize(**kwargs)


def test_cluster_detection(no_cluster):
  assert distributed.detected_cluster() is None
  assert distributed.initialize() is False  # a plain single process: nothing to join
  no_cluster.setenv("SLURM_JOB_ID", "7")
  no_cluster.setenv("SLURM_STEP_NODELIST", "node[1-2]")
  no_cluster.setenv("SLURM_NTASKS", "1")
  assert distributed.detected_cluster() is None  # one task: no one to talk to
  no_cluster.setenv("SLURM_NTASKS", "16")
  assert distributed.detected_cluster() == "slurm"
  no_cluster.delenv("SLURM_JOB_ID")
  no_cluster.setenv("TPU_WORKER_HOSTNAMES", "w-0,w-1,w-2,w-3")
  assert distributed.detected_cluster() == "tpu (gke)"
