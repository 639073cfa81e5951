"""Supervised fine-tuning with LoRA on a tiny Llama-style checkpoint written by llmx's own export:
the loss falls, only adapters are trained and checkpointed, resume, merged export, bad targets."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

from llmx import pretrained
from llmx.families.lm import sft
from llmx.families.lm.model import GPT, GPTConfig
from llmx.formats.tokenizer import PretrainedTokenizer
from llmx.train import run
from llmx.train.checkpoint import Checkpointer
from llmx.train.config_check import ConfigError
from tests.conftest import load_config

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny random Llama-style model and a byte-level BPE chat tokenizer, saved as an HF folder."""
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator([f"say {w}. {w} {w}!" for w in WORDS] * 5, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok = PretrainedTokenizer(bpe, chat_template=CHATML, eos_token="<|im_end|>",
                            bos_token="<|im_start|>")
  config = GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4, n_kv_head=2,
                     d_model=32, bias=False, positions="rope", norm="rmsnorm", mlp="swiglu",
                     mlp_hidden=64, tie_embeddings=True)
  folder = tmp_path_factory.mktemp("base") / "hf"
  pretrained.save(GPT(config, rngs=nnx.Rngs(0)), tok, folder)
  rng = np.random.default_rng(0)
  lines = []
  for _ in range(48):  # a learnable reply: the word, twice
    w = WORDS[rng.integers(len(WORDS))]
    lines.append(json.dumps({"messages": [{"role": "user", "content": f"say {w}."},
                                          {"role": "assistant", "content": f"{w} {w}!"}]}))
  data = folder.parent / "chat.jsonl"
  data.write_text("\n".join(lines) + "\n")
  return folder, data


def _config(base, **train):
  folder, data = base
  c = load_config("sft.py")
  c.model.checkpoint = str(folder)
  c.data.update(path=str(data), held_out=8, seq_len=64, max_turns=0)
  c.train.update(steps=30, batch_size=8, learning_rate=5e-2, min_learning_rate=5e-3, warmup_steps=2,
                 eval_every=15, checkpoint_every=15, log_every=5, **train)
  c.train.lora.update(rank=4, alpha=8.0, dropout=0.0, targets="q,v,down")
  c.eval.update(batch_size=4, samples=2, max_new_tokens=6)
  return c


def test_lora_learns_trains_only_adapters_resumes_and_exports(base, tmp_path):
  c = _config(base)
  result = run.train(sft.FINETUNE, c, str(tmp_path))
  report = result.final
  # A random tiny base barely moves under low-rank updates (its tied head is frozen), but the
  # adapters must move the held-out loss (full fine-tuning of this base reaches 0.85).
  assert report["val_loss_after"] < report["val_loss_before"] - 0.15, report
  # Adapters: per layer q (A 32x4, B 4x32), v (A 32x4, B 4x16), down (A 64x4, B 4x32).
  per_layer = (32 * 4 + 4 * 32) + (32 * 4 + 4 * 16) + (64 * 4 + 4 * 32)
  assert report["trained_params"] == 2 * per_layer
  # Checkpoints hold the adapters and their Adam moments, never the frozen base.
  ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
  abstract = jax.eval_shape(lambda: {k: v for k, v in result.state.items() if k != "frozen"})
  step, state, _ = ckpt.restore(abstract)
  ckpt.close()
  assert step == 30 and "frozen" not in state
  adapters = sum(x.size for x in jax.tree.leaves(state["params"]))
  moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
  assert adapters == 2 * per_layer and moments == 2 * adapters
  # The merged export computes what the adapted model computes.
  exported, _ = pretrained.load(tmp_path / "export")
  ids = jnp.asarray([[5, 9, 17, 3, 40, 41]])
  np.testing.assert_allclose(np.asarray(exported(ids)), np.asarray(result.model(ids)), atol=1e-5)
  # Resume: ten more steps continue from step 30; the base loss is not evaluated again.
  c.train.update(steps=40, lr_decay_steps=30)  # the schedule keeps its length
  again = run.train(sft.FINETUNE, c, str(tmp_path))
  steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps.count(0) == 1 and steps[-1] == 40 and again.history[0]["step"] == 35


def test_bad_lora_targets_and_data_are_one_line_errors(base):
  c = _config(base)
  c.train.lora.targets = "q,zz"
  with pytest.raises(ConfigError, match=r"^train\.lora\.targets='q,zz': zz names no layer"):
    sft.validate(c)
  c = _config(base)
  c.data.held_out = 1000
  with pytest.raises(ConfigError, match=r"^data\.held_out=1000: the data has only 48"):
    sft.conversations(c)


def test_sigkill_then_resume_gives_the_uninterrupted_adapters(base, tmp_path):
  """The CLI killed after step 18 (checkpoints every 5, saved asynchronously) resumes from its
  newest finished checkpoint and ends with the adapters of a run that was never interrupted, bit
  for bit; the frozen base is read again from the base checkpoint, not from the run's."""
  import re
  import signal
  import subprocess
  import sys

  from tests.conftest import REPO
  from tests.test_reliability import run_until_step
  folder, data = base

  def command(workdir):
    return [sys.executable, "-m", "experiments.finetune_lm", "--config=experiments/configs/sft.py",
            f"--workdir={workdir}", f"--config.model.checkpoint={folder}",
            f"--config.data.path={data}", "--config.data.held_out=8", "--config.data.seq_len=64",
            "--config.data.max_turns=0", "--config.train.steps=20", "--config.train.batch_size=4",
            "--config.train.log_every=1", "--config.train.checkpoint_every=5",
            "--config.train.eval_every=0", "--config.train.eval_at_start=false",
            "--config.train.lora.rank=4", "--config.eval.samples=0", "--config.eval.batch_size=4"]

  env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  proc, out = run_until_step(command(tmp_path / "killed"), env, 18,
                             lambda p: p.send_signal(signal.SIGKILL))
  assert proc.returncode == -signal.SIGKILL, out[-2000:]
  for workdir in ("killed", "uninterrupted"):
    done = subprocess.run(command(tmp_path / workdir), cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    if workdir == "killed":
      resumed = re.search(r"resumed from .* at step (\d+)", done.stdout)
      assert resumed and int(resumed.group(1)) in (5, 10, 15), done.stdout[-2000:]

  def adapters(workdir):
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    meta = ckpt.latest_meta()
    ckpt.close()
    assert meta["trained_params"] < meta["total_params"]
    exported, _ = pretrained.load(workdir / "export")
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(exported, nnx.Param))]

  for a, b in zip(adapters(tmp_path / "killed"), adapters(tmp_path / "uninterrupted")):
    np.testing.assert_array_equal(a, b)
