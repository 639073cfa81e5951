"""Bad values and faults a new user runs into, each reported in one line before harm is done.

Config values are checked over every family's config file (the checks live in one place,
llmx/train/preflight.py, that `run.train` passes every config through); broken states are never
saved; resume says what changed; one writer per run folder; read-only tools write nothing;
inference inputs are checked; a full disk is one line naming the last good checkpoint.
"""
import errno
import glob
import json
import os
import pathlib
import socket

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import llmx_kernels as kernels
from llmx import inference
from llmx.families.lm import recipe as lm_recipe
from llmx.families.lm.model import GPT, GPTConfig
from llmx.train import loop, preflight, run, run_lock
from llmx.train.checkpoint import CheckpointError, Checkpointer
from llmx.train.config_check import ConfigError
from tests.conftest import cli, load_config

CONFIG_FILES = sorted(os.path.basename(f) for f in glob.glob(
    str(pathlib.Path(__file__).parents[1] / "experiments" / "configs" / "[a-z]*.py")))


def smoke(**train):
  """lm.py:smoke, tiny and quick, on the embedded corpus."""
  c = load_config("lm.py:smoke")
  c.model.update(n_layer=1, n_head=2, d_model=16, block_size=16)
  c.train.update(batch_size=4, steps=4, log_every=1, checkpoint_every=2, eval_every=0,
                 eval_batches=1)
  c.sample.max_new_tokens = 0
  c.train.update(**train)
  return c


# ------------------------------------------------------------------ config values, every family

BAD_TRAIN = [
    (dict(grad_clip=-1.0), r"train.grad_clip=-1.0: must lie in \[0.0, inf\)"),
    (dict(beta1=1.0), r"train.beta1=1.0: must lie in \[0.0, 1.0\)"),
    (dict(beta2=-0.1), r"train.beta2=-0.1: must lie in \[0.0, 1.0\)"),
    (dict(learning_rate=1e-3, min_learning_rate=1e-2),
     r"train.min_learning_rate=0.01 is above train.learning_rate=0.001"),
    (dict(steps=10, warmup_steps=11, lr_decay_steps=0),
     r"train.warmup_steps=11 is longer than train.steps=10"),
    (dict(max_checkpoints=0), r"train.max_checkpoints=0: must be an integer >= 1 \(the newest"),
    (dict(steps=0), r"train.steps=0: must be an integer >= 1"),
    (dict(log_every=0), r"train.log_every=0: must be an integer >= 1"),
]


@pytest.mark.parametrize("config_file", CONFIG_FILES)
@pytest.mark.parametrize("bad, message", BAD_TRAIN, ids=[str(b) for b, _ in BAD_TRAIN])
def test_every_family_config_rejects_bad_train_values(config_file, bad, message):
  c = load_config(config_file)
  preflight.check_config(c, num_devices=1)  # the shipped default is valid
  with c.unlocked():
    for field, value in bad.items():
      c.train[field] = value
  with pytest.raises(ConfigError, match=message):
    preflight.check_config(c, num_devices=1)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1.0, r"sample.temperature=-1.0: must be a number >= 0"),
    ("top_k", -2, r"sample.top_k=-2: must be an integer >= 0"),
    ("max_new_tokens", -5, r"sample.max_new_tokens=-5: must be an integer >= 0"),
    ("seed", -1, r"sample.seed=-1: must be an integer >= 0"),
])
def test_sample_values_are_checked_before_training(field, value, message, tmp_path):
  c = smoke()
  c.sample[field] = value
  with pytest.raises(ConfigError, match=message):
    run.train(lm_recipe.RECIPE, c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # rejected before the run folder was made


@pytest.mark.parametrize("config_file", CONFIG_FILES)
def test_every_family_config_rejects_a_bad_mesh(config_file):
  c = load_config(config_file)
  c.mesh.data = 3
  with pytest.raises(ConfigError, match=r"mesh.data=3.*does not divide the 2 devices|multiply"):
    preflight.check_config(c, num_devices=2)


def test_misspelt_field_is_one_line_with_a_suggestion(tmp_path):
  proc = cli("experiments.pretrain_lm", "--config=experiments/configs/lm.py:smoke",
             f"--workdir={tmp_path}/run", "--config.train.setps=3", check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("error: --config.train.setps=3: the config has no field 'setps'; "
                                 "did you mean 'steps'?"), proc.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def test_non_boolean_value_for_a_boolean_field_is_one_line(tmp_path):
  proc = cli("experiments.pretrain_lm", "--config=experiments/configs/lm.py:smoke",
             f"--workdir={tmp_path}/run", "--config.train.grad_accum_unroll=2", check=False)
  assert proc.returncode == 2
  first = proc.stderr.strip().splitlines()[0]
  assert first == ("error: flag --config.train.grad_accum_unroll=2: "
                   "('Non-boolean argument to boolean flag', '2')"), proc.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def test_keep_best_metric_must_name_a_metric_the_evaluation_produces(tmp_path):
  with pytest.raises(ConfigError, match=r"train.keep_best_metric='val_acc': the evaluation never "
                                        r"produces it; choose one of 'val_loss'"):
    run.train(lm_recipe.RECIPE, smoke(keep_best_metric="val_acc"), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_workdir_that_is_a_file_or_not_writable(tmp_path, monkeypatch):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(ConfigError, match=r"--workdir=.*file: is a file, not a folder"):
    run.train(lm_recipe.RECIPE, smoke(), str(a_file))
  with pytest.raises(ConfigError, match=r"--workdir=.*file/run: cannot write there"):
    run.train(lm_recipe.RECIPE, smoke(), str(a_file / "run"))  # under a file

  def read_only_mount(*args, **kwargs):  # what a write under a read-only mount raises
    raise OSError(errno.EROFS, "Read-only file system")
  monkeypatch.setattr(preflight.tempfile, "NamedTemporaryFile", read_only_mount)
  with pytest.raises(ConfigError, match=r"--workdir=.*ro: cannot write there \(Read-only file "
                                        r"system\); pick a writable folder"):
    run.train(lm_recipe.RECIPE, smoke(), str(tmp_path / "ro"))


# ------------------------------------------------------------------ broken states never saved

@pytest.mark.parametrize("steps, every", [(2, 0), (4, 1)])
def test_an_update_that_breaks_the_parameters_is_never_saved(tmp_path, steps, every):
  work = tmp_path / "run"
  with pytest.raises(loop.NonFiniteLossError, match=r"became NaN or Inf at step \d+; stopped "
                                                    r"without saving that state"):
    run.train(lm_recipe.RECIPE, smoke(learning_rate=1e30, steps=steps, checkpoint_every=every,
                                      grad_clip=0.0, warmup_steps=0), str(work))
  saved = Checkpointer(work / "checkpoints", read_only=True).steps()
  assert saved == ([] if every == 0 else saved)
  if saved:  # whatever was saved holds finite parameters only
    model, _, _, _ = lm_recipe.load_run(str(work))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


# ------------------------------------------------------------------ resume is honest

def test_resume_names_what_changed_and_keeps_the_checkpoints(tmp_path):
  work = str(tmp_path / "run")
  run.train(lm_recipe.RECIPE, smoke(), work)
  saved = Checkpointer(pathlib.Path(work) / "checkpoints", read_only=True).steps()

  with pytest.raises(ConfigError, match=r"train state of another structure.*train.grad_clip: 1.0 "
                                        r"in the checkpoint, 0.0 now.*checkpoints are intact"):
    run.train(lm_recipe.RECIPE, smoke(grad_clip=0.0), work)
  with pytest.raises(ConfigError, match=r"train.batch_size: 4 in the checkpoint, 8 now.*"
                                        r"allow_batch_size_change=True"):
    run.train(lm_recipe.RECIPE, smoke(batch_size=8), work)
  with pytest.raises(ConfigError, match=r"train.lr_schedule_steps: 4 in the checkpoint, 8 now.*"
                                        r"--config.train.lr_decay_steps=4"):
    run.train(lm_recipe.RECIPE, smoke(steps=8), work)
  c = smoke()
  c.data.val_fraction = 0.2  # other training tokens: the data fingerprint differs
  with pytest.raises(ConfigError, match=r"data.tokens_sha256"):
    run.train(lm_recipe.RECIPE, c, work)
  assert Checkpointer(pathlib.Path(work) / "checkpoints", read_only=True).steps() == saved
  assert not (pathlib.Path(work) / "damaged_checkpoints").exists()

  # Training on past the schedule with its length kept: the rate stays at its floor.
  result = run.train(lm_recipe.RECIPE, smoke(steps=8, lr_decay_steps=4), work)
  rates = [h["learning_rate"] for h in result.history]
  assert result.step == 8 and len(rates) == 4
  np.testing.assert_allclose(rates, smoke().train.min_learning_rate, rtol=1e-6)
  # A deliberate batch size change.
  assert run.train(lm_recipe.RECIPE, smoke(steps=10, lr_decay_steps=4, batch_size=8,
                                           allow_batch_size_change=True), work).step == 10


def test_a_changed_data_position_is_caught_like_a_changed_array(tmp_path, caplog):
  work = tmp_path / "run"
  run.train(lm_recipe.RECIPE, smoke(), str(work))
  [data_file] = (work / "checkpoints" / "4" / "data").glob("process_0-of-1.json")
  state = json.loads(data_file.read_text())
  state["next_index"] = 1  # as if the file had been damaged: batches would repeat
  data_file.write_text(json.dumps(state))
  result = run.train(lm_recipe.RECIPE, smoke(steps=4), str(work))
  assert "data position" in caplog.text and "checkpoint 4" in caplog.text
  assert result.step == 4  # resumed from step 2, the one before, and trained to the end
  assert any((work / "damaged_checkpoints").iterdir())


# ------------------------------------------------------------------ one writer per run folder

def test_a_second_trainer_on_the_same_folder_fails_at_once(tmp_path):
  work = tmp_path / "run"
  work.mkdir()
  with run_lock.held(work):
    holder = json.loads((work / run_lock.LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(run_lock.RunFolderBusy, match=rf"--workdir={work} is in use by process "
                                                     rf"{os.getpid()} on this host"):
      run.train(lm_recipe.RECIPE, smoke(), str(work))
  assert not (work / run_lock.LOCK_NAME).exists()  # released


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path, caplog):
  work = tmp_path / "run"
  work.mkdir()
  dead = 2 ** 22 + 12345  # above the default pid_max: no such process
  (work / run_lock.LOCK_NAME).write_text(json.dumps(dict(pid=dead, host=socket.gethostname(),
                                                         started="earlier")))
  assert run.train(lm_recipe.RECIPE, smoke(steps=2), str(work)).step == 2
  assert "taking over" in caplog.text
  (work / run_lock.LOCK_NAME).write_text(json.dumps(dict(pid=1, host="another-host",
                                                         started="earlier")))
  with pytest.raises(run_lock.RunFolderBusy, match=r"host another-host.*delete"):
    run.train(lm_recipe.RECIPE, smoke(steps=2), str(work))


# ------------------------------------------------------------------ read-only tools

def test_read_only_tools_create_and_change_nothing(tmp_path):
  typo = tmp_path / "no_such_run"
  proc = cli("experiments.generate", f"--workdir={typo}", "--max_new_tokens=2", check=False)
  assert proc.returncode == 2 and "no checkpoints folder" in proc.stderr, proc.stderr[-2000:]
  proc = cli("experiments.eval_lm", f"--workdir={typo}", check=False)
  assert proc.returncode == 2 and "no checkpoints folder" in proc.stderr
  assert not typo.exists()

  work = tmp_path / "run"
  run.train(lm_recipe.RECIPE, smoke(), str(work))
  (work / "checkpoints" / "4" / "state" / "manifest.ocdbt").unlink()  # damaged
  before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
  model, _, _, step = lm_recipe.load_run(str(work))  # falls back to step 2 without moving 4
  assert step == 2
  assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before


def test_eval_lm_rejects_a_batch_size_below_one(tmp_path):
  proc = cli("experiments.eval_lm", f"--workdir={tmp_path}", "--batch_size=-1", check=False)
  assert proc.returncode == 2 and "--batch_size=-1 must be >= 1" in proc.stderr


# ------------------------------------------------------------------ inference inputs

@pytest.fixture(scope="module")
def tiny_lm():
  return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=8),
             rngs=nnx.Rngs(0))


@pytest.mark.parametrize("prompts, options, message", [
    ([np.array([1, 11])], {}, r"prompt 0 holds token id 11, outside the model's vocabulary \[0, 11\)"),
    ([np.array([3, -1])], {}, r"token id -1, outside"),
    ([np.array([1, 2, 3])], dict(max_length=2), r"max_length=2 is shorter than the longest prompt"),
    ([np.array([1])], dict(max_new_tokens=2.5), r"max_new_tokens=2.5: must be an integer >= 0"),
    ([np.array([1])], dict(max_new_tokens=10 ** 8), r"max_new_tokens=100000000: at most 65,536"),
])
def test_decode_rejects_bad_inputs(tiny_lm, prompts, options, message):
  options = dict(dict(max_new_tokens=2), **options)
  with pytest.raises(inference.DecodingError, match=message):
    inference.decode(tiny_lm, prompts, **options)


def test_cudnn_attention_on_cpu_is_the_ops_own_error():
  q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"implementation='cudnn' cannot serve these arguments: "
                                       r"cuDNN runs on NVIDIA GPUs, not on 'cpu'"):
    kernels.dot_product_attention(q, q, q, implementation="cudnn")


# ------------------------------------------------------------------ a full disk

def test_disk_full_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
  work = tmp_path / "run"
  run.train(lm_recipe.RECIPE, smoke(steps=2), str(work))
  real_save = ocp.CheckpointManager.save

  def full(self, step, *args, **kwargs):
    if step >= 4:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  with pytest.raises(CheckpointError) as info:
    run.train(lm_recipe.RECIPE, smoke(steps=6, lr_decay_steps=2), str(work))
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith("disk full while writing checkpoint 4") and "last good checkpoint is "
  assert "step 2" in message, message
