r"""Pretrains a decoder-only LM. See experiments/configs/lm.py for launch commands and variants.

  python -m experiments.pretrain_lm --config=experiments/configs/lm.py --workdir=/tmp/lm
"""
import logging

import jax
from absl import flags
from ml_collections import config_flags

from experiments import lm_setup, run, setup_logging
from llmx.data.lm_windows import fixed_batches, lm_batches
from llmx.generation import generate
from llmx.models.gpt import flops_per_token, num_params
from llmx.train import loop
from llmx.train.mesh import make_mesh
from llmx.train.step import supervised

log = logging.getLogger("llmx")

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/lm.py", "LM config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics, checkpoints.", required=True)


def main(argv):
  del argv
  setup_logging()
  c = _CONFIG.value
  lm_setup.validate(c)
  tokenizer, train_tokens, val_tokens = lm_setup.load_tokens(c)
  gpt_config = lm_setup.model_config(c, tokenizer.vocab_size)
  model = lm_setup.build_model(gpt_config, c.train.seed)
  tx, schedule = lm_setup.build_optimizer(c)
  mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)

  n_params = num_params(model)
  tokens_per_step = c.train.batch_size * c.model.block_size
  log.info("model: %.2fM parameters, vocab %d, %d train / %d val tokens, %d devices",
               n_params / 1e6, tokenizer.vocab_size, len(train_tokens), len(val_tokens),
               jax.device_count())
  meta = dict(
      must_match=dict(model=lm_setup.gpt_config_to_dict(gpt_config), tokenizer=tokenizer.to_json()),
      config=c.to_dict(), n_params=n_params)
  batches = dict(block_size=c.model.block_size, batch_size=c.train.batch_size)
  result = loop.train(
      supervised(model, tx, lm_setup.lm_loss), schedule=schedule, mesh=mesh,
      train_batches=lm_batches(train_tokens, seed=c.train.seed, **batches,
                               process_index=jax.process_index(), process_count=jax.process_count()),
      eval_batches=fixed_batches(val_tokens, seed=c.train.seed + 1,
                                 num_batches=c.train.eval_batches, **batches),
      workdir=_WORKDIR.value, meta=meta,
      options=loop.LoopOptions(
          steps=c.train.steps, eval_every=c.train.eval_every,
          checkpoint_every=c.train.checkpoint_every, log_every=c.train.log_every,
          max_to_keep=c.train.max_checkpoints, tokens_per_step=tokens_per_step,
          flops_per_step=tokens_per_step * flops_per_token(gpt_config, n_params, c.model.block_size)))

  if jax.process_index() == 0 and c.sample.max_new_tokens:
    s = c.sample
    out = generate(result.model, tokenizer.encode(s.prompt), max_new_tokens=s.max_new_tokens,
                   block_size=c.model.block_size, temperature=s.temperature, top_k=s.top_k,
                   seed=s.seed)
    print(f"--- sample after step {result.step} ---\n{tokenizer.decode(out)}\n---", flush=True)


if __name__ == "__main__":
  run(main)
