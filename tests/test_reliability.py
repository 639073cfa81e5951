"""Training that never loses work: SIGKILL at random moments, damaged checkpoints, NaN, SIGTERM.

The subprocess tests run the LM experiment as a user does, with a tiny model; they share one
persistent XLA compilation cache (JAX_COMPILATION_CACHE_DIR, per pytest session), so restarts
skip recompiling.
"""
import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from llmx.families.lm import recipe as lm_recipe
from llmx.data.lm_windows import fixed_batches, lm_batches
from llmx.families.lm.model import GPT, GPTConfig
from llmx.train import loop, optimizers
from llmx.train.checkpoint import CheckpointError, Checkpointer
from llmx.train.step import supervised
from tests.conftest import REPO, adamw

STEPS = 60


def lm_command(workdir, data_dir, *extra):
  return [sys.executable, "-m", "experiments.pretrain_lm", "--config=experiments/configs/lm.py:smoke",
          f"--workdir={workdir}", f"--config.data.path={data_dir / 'tinyshakespeare.txt'}",
          "--config.model.n_layer=1", "--config.model.n_head=2", "--config.model.d_model=16",
          "--config.model.block_size=16", "--config.model.dropout=0.1",
          "--config.train.batch_size=4", f"--config.train.steps={STEPS}",
          "--config.train.log_every=1", "--config.train.checkpoint_every=4",
          "--config.train.eval_every=0", "--config.train.eval_batches=1",
          "--config.sample.max_new_tokens=0", *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
  # The parent of the per-worker temp folder: shared by pytest-xdist's workers in one session.
  cache_dir = tmp_path_factory.getbasetemp().parent / "llmx-test-xla-cache"
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
          "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


STEP_LINE = re.compile(r"step (\d+) \|")


def run_until_step(cmd, env, step: int, then):
  """Starts `cmd`, waits for its log line of `step` (or later), then calls then(proc); returns
  (proc, everything it printed)."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    m = STEP_LINE.search(line)
    if m and int(m.group(1)) >= step:
      then(proc)
      break
  lines += proc.stdout.readlines()
  proc.wait(timeout=300)
  return proc, "".join(lines)


def metrics(workdir) -> dict:
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {l["step"]: l for l in lines}, [l["step"] for l in lines]


def final_state(workdir):
  model, _, _, step = lm_recipe.load_run(str(workdir))
  as_numpy = lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x)
  return step, [as_numpy(x) for x in jax.tree.leaves(nnx.state(model))]


def test_sigkill_at_five_random_moments_then_resume_is_bitwise_identical(tmp_path, data_dir, env):
  seed = int.from_bytes(os.urandom(4), "little")
  rng = random.Random(seed)
  kill_after = sorted(rng.sample(range(2, STEPS - 15), 5))
  delays = [rng.uniform(0.0, 0.15) for _ in kill_after]
  context = f"seed {seed}: SIGKILL after the log line of steps {kill_after}, delays {delays}"
  reference_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
  reference = subprocess.Popen(lm_command(reference_dir, data_dir), cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  resumed_from, unfinished_saves = [], 0
  for step, delay in zip(kill_after, delays):
    def kill(proc, delay=delay):
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
    proc, out = run_until_step(lm_command(killed_dir, data_dir), env, step, kill)
    assert proc.returncode == -signal.SIGKILL, f"{context}: the run ended by itself\n{out[-2000:]}"
    unfinished_saves += bool(list((killed_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*")))
    m = re.search(r"resumed from .* at step (\d+)", out)
    resumed_from.append(int(m.group(1)) if m else 0)
  final = subprocess.run(lm_command(killed_dir, data_dir), cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=300)
  assert final.returncode == 0, f"{context}\n{final.stdout[-2000:]}\n{final.stderr[-2000:]}"
  assert f"step {STEPS} |" in final.stdout
  out, _ = reference.communicate(timeout=300)
  assert reference.returncode == 0, out[-2000:]
  print(f"\n{context}; the restarts resumed from steps {resumed_from}; {unfinished_saves} kills "
        f"left a save unfinished")
  assert resumed_from == sorted(resumed_from) and resumed_from[-1] > 0, context

  # The same loss curve, every step logged once, and bitwise the same final state.
  (ref_lines, ref_steps), (lines, steps) = metrics(reference_dir), metrics(killed_dir)
  assert steps == ref_steps == list(range(1, STEPS + 1)), context
  assert [lines[s]["train_loss"] for s in steps] == [ref_lines[s]["train_loss"] for s in steps], context
  (ref_step, ref_state), (step, state) = final_state(reference_dir), final_state(killed_dir)
  assert ref_step == step == STEPS
  for a, b in zip(ref_state, state, strict=True):
    np.testing.assert_array_equal(a, b, err_msg=context)


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, data_dir, env):
  work = tmp_path / "run"
  cmd = lm_command(work, data_dir, "--config.train.checkpoint_every=0")  # only at the end
  proc, out = run_until_step(cmd, env, 7, lambda p: p.send_signal(signal.SIGTERM))
  # 143 = 128 + SIGTERM: a scheduler sees a job that did not finish (and was saved).
  assert proc.returncode == 143, out[-3000:]
  assert "preempted: SIGTERM: saved step" in out and "re-run the same command" in out, out[-3000:]
  m = re.search(r"SIGTERM received: checkpointing step (\d+) and stopping", out)
  assert m and "Traceback" not in out, out[-3000:]
  stopped = int(m.group(1))
  assert 7 <= stopped < STEPS
  assert Checkpointer(work / "checkpoints").steps() == [stopped]
  _, logged = metrics(work)
  assert logged == list(range(1, stopped + 1))
  again = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
  assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
  assert f"at step {stopped}" in again.stdout and f"step {STEPS} |" in again.stdout
  assert metrics(work)[1] == list(range(1, STEPS + 1))


def test_nan_loss_stops_the_experiment_with_one_line_and_keeps_the_last_good_checkpoint(
    tmp_path, data_dir, env):
  work = tmp_path / "run"
  # With bf16 compute, full remat and 2 micro-batches: the scaling options run end to end too.
  proc = subprocess.run(
      lm_command(work, data_dir, "--config.train.learning_rate=1e30",
                 "--config.train.checkpoint_every=1", "--config.model.dtype=bfloat16",
                 "--config.model.remat=full", "--config.train.grad_accum_steps=2"),
      cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  m = re.search(r"error: the training loss or the updated parameters became NaN or Inf at step "
                r"(\d+); stopped without saving that state \(the last good checkpoint is step "
                r"(\d+) in ", proc.stderr)
  assert m, proc.stderr[-2000:]
  bad = int(m.group(1))
  assert Checkpointer(work / "checkpoints").steps()[-1] == bad - 1 == int(m.group(2))
  step, state = final_state(work)
  assert step == bad - 1 and all(np.isfinite(x).all() for x in state if x.dtype.kind == "f")


# In-process: damaged checkpoints. One Trainable for every run, so the step compiles once.
TOKENS = np.random.default_rng(7).integers(0, 29, 5000).astype(np.int32)


@functools.lru_cache(maxsize=1)
def tiny_trainable():
  cfg = GPTConfig(vocab_size=29, block_size=16, n_layer=1, n_head=2, d_model=16, dropout=0.1)
  sched = optimizers.warmup_cosine(1e-3, warmup_steps=2, decay_steps=12, end=1e-4)
  return supervised(lambda: GPT(cfg, rngs=nnx.Rngs(params=0, dropout=1)), adamw(sched),
                    lambda model, batch: model.loss(batch[:, :-1], batch[:, 1:]))


def train(workdir, steps):
  return loop.train(
      tiny_trainable(), train_batches=lm_batches(TOKENS, block_size=16, batch_size=4, seed=0),
      eval_batches=fixed_batches(TOKENS, block_size=16, batch_size=4, num_batches=1, seed=1),
      workdir=str(workdir), meta=dict(must_match=dict(model="tiny")),
      options=loop.LoopOptions(steps=steps, checkpoint_every=2, log_every=2))


def state_leaves(state):
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else x) for x in jax.tree.leaves(state)]


def largest_array_file(step_dir):
  """The largest of the files that hold array bytes (not orbax's JSON metadata)."""
  files = [p for p in (step_dir / "state").glob("ocdbt.process_*/d/*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def test_damaged_and_incomplete_checkpoints_are_reported_and_the_previous_one_used(tmp_path, caplog):
  reference = train(tmp_path / "reference", 8)
  work = tmp_path / "run"
  train(work, 6)
  ckpts = work / "checkpoints"
  assert Checkpointer(ckpts).steps() == [2, 4, 6]
  # Step 6: bit rot in the middle of its largest array file. Step 4: a file missing.
  rotten = largest_array_file(ckpts / "6")
  data = bytearray(rotten.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
  rotten.write_bytes(bytes(data))
  largest_array_file(ckpts / "4").unlink()

  with caplog.at_level("ERROR", logger="llmx"):
    resumed = train(work, 8)
  errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
  # Where the rot lands decides who notices: TensorStore (a compressed chunk or an index node that
  # no longer decodes) or the fingerprints (bytes that decode to other numbers).
  assert any(m.startswith("checkpoint 6 in ") and ("damaged or incomplete" in m
                                                    or "do not match the fingerprints" in m)
             for m in errors), errors
  assert any(m.startswith("checkpoint 4 in ") and "damaged or incomplete" in m for m in errors), errors
  assert sorted(p.name.split("-")[0] for p in (work / "damaged_checkpoints").iterdir()) == ["4", "6"]
  # Resumed from step 2 and ended exactly where the uninterrupted run did.
  assert resumed.history[0]["step"] == 4
  for a, b in zip(state_leaves(reference.state), state_leaves(resumed.state), strict=True):
    np.testing.assert_array_equal(a, b)
  assert Checkpointer(ckpts).steps() == [4, 6, 8]


def test_arrays_that_read_back_changed_are_caught_by_the_fingerprints(tmp_path, caplog):
  """Bytes that still decode, to other numbers, pass every check of orbax's own: only the
  fingerprints written beside the arrays catch them. Here the record, not the array, is changed,
  so the arrays read back cleanly and differ from what the record says."""
  train(tmp_path, 4)
  record = tmp_path / "checkpoints" / "4" / "integrity" / "metadata"
  integrity = json.loads(record.read_text())
  integrity["fingerprints"][-1] ^= 1
  record.write_text(json.dumps(integrity))
  with caplog.at_level("ERROR", logger="llmx"):
    resumed = train(tmp_path, 4)
  errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
  assert any(m.startswith("checkpoint 4 in ") and "do not match the fingerprints" in m
             for m in errors), errors
  assert resumed.history[0]["step"] == 4  # retrained from step 2 rather than loading step 4
  assert [p.name.split("-")[0] for p in (tmp_path / "damaged_checkpoints").iterdir()] == ["4"]


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  train(tmp_path, 2)
  (tmp_path / "checkpoints" / "2" / "state" / "manifest.ocdbt").unlink()
  with pytest.raises(CheckpointError, match=r"none of the checkpoints \[2\] in .* could be read"):
    train(tmp_path, 4)
  assert (tmp_path / "checkpoints" / "2").is_dir()  # left where it was for the user


def test_keeps_the_last_k_and_the_best_checkpoint(tmp_path):
  state = dict(w=jax.numpy.arange(6.0).reshape(2, 3), step=jax.numpy.zeros((), "int32"))
  ckpt = Checkpointer(tmp_path, max_to_keep=2, best_metric="val_loss", best_mode="min")
  for step, val_loss in zip(range(1, 7), [3.0, 1.0, 2.0, None, 4.0, 5.0]):
    ckpt.save(step, state, {}, metrics=None if val_loss is None else {"val_loss": val_loss})
    ckpt.wait()
  assert ckpt.steps() == [2, 5, 6]  # the best (step 2) and the newest two
  ckpt.close()
  with pytest.raises(ValueError, match="best_mode='lowest'"):
    Checkpointer(tmp_path / "other", best_metric="val_loss", best_mode="lowest")


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
  from llmx.train.metrics import MetricsWriter
  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 1, "train_loss": 3.0}\n{"step": 2, "train_loss": 2.5}\n{"step": 3, "train_lo')
  writer = MetricsWriter(str(tmp_path), resume_step=2)
  writer.write(3, {"train_loss": 2.0})
  writer.close()
  assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
