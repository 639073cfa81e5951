r"""Pretrains a decoder-only LM. See experiments/configs/lm.py for launch commands and variants.

  python -m experiments.pretrain_lm --config=experiments/configs/lm.py --workdir=/tmp/lm

Scale-out (BUILD.md): `--config.mesh.fsdp=-1` shards parameters and optimizer state over all
devices; several processes (hosts) join with --coordinator_address/--num_processes/--process_id,
or by themselves on TPU pods and under SLURM. Re-running the same command resumes.
"""
import functools
import logging

import jax
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from llmx.families.lm import recipe as lm_setup
from llmx.train.launch import run
from llmx.data.lm_windows import fixed_batches, lm_batches
from llmx.inference.sampling import generate
from llmx.families.lm.model import flops_per_token, num_params
from llmx.train import loop
from llmx.train.mesh import check_batch_size, data_shard, mesh_from_config, process_rows
from llmx.train.step import supervised

log = logging.getLogger("llmx")

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/lm.py", "LM config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics, checkpoints.", required=True)


def main(argv):
  del argv
  c = _CONFIG.value
  lm_setup.validate(c)
  mesh = mesh_from_config(c.mesh)
  check_batch_size(mesh, c.train.batch_size, grad_accum_steps=c.train.grad_accum_steps)
  tokenizer, train_tokens, val_tokens = lm_setup.load_tokens(c)
  gpt_config = lm_setup.model_config(c, tokenizer.vocab_size)
  # A builder, not a model: the loop creates the parameters already sharded over the mesh.
  build_model = functools.partial(lm_setup.build_model, gpt_config, c.train.seed,
                                  remat=c.model.remat)
  tx, schedule = lm_setup.build_optimizer(c)
  trainable = supervised(build_model, tx, lm_setup.lm_loss,
                         grad_accum_steps=c.train.grad_accum_steps,
                         compute_dtype=lm_setup.compute_dtype(c))

  n_params = num_params(nnx.eval_shape(build_model))
  tokens_per_step = c.train.batch_size * c.model.block_size
  log.info("model: %.2fM parameters, vocab %d, %d train / %d val tokens, %d devices in %d "
           "processes", n_params / 1e6, tokenizer.vocab_size, len(train_tokens), len(val_tokens),
           jax.device_count(), jax.process_count())
  meta = dict(
      must_match=dict(model=lm_setup.gpt_config_to_dict(gpt_config), tokenizer=tokenizer.to_json()),
      config=c.to_dict(), n_params=n_params)
  batches = dict(block_size=c.model.block_size, batch_size=c.train.batch_size)
  # Each process loads only the rows of each global batch that its own devices hold.
  shard_index, shard_count = data_shard(mesh, c.train.batch_size)
  eval_batches = fixed_batches(val_tokens, seed=c.train.seed + 1,
                               num_batches=c.train.eval_batches, **batches)
  result = loop.train(
      trainable, schedule=schedule, mesh=mesh,
      train_batches=lm_batches(train_tokens, seed=c.train.seed, **batches,
                               process_index=shard_index, process_count=shard_count),
      eval_batches=[process_rows(b, mesh) for b in eval_batches],
      workdir=_WORKDIR.value, meta=meta,
      options=loop.LoopOptions(
          steps=c.train.steps, eval_every=c.train.eval_every,
          checkpoint_every=c.train.checkpoint_every, log_every=c.train.log_every,
          max_to_keep=c.train.max_checkpoints, best_metric=c.train.keep_best_metric,
          tokens_per_step=tokens_per_step,
          flops_per_step=tokens_per_step * flops_per_token(gpt_config, n_params, c.model.block_size)))

  if c.sample.max_new_tokens and not result.preempted:
    model = on_every_host(result.model, mesh)
    if jax.process_index() == 0:
      s = c.sample
      out = generate(model, tokenizer.encode(s.prompt), max_new_tokens=s.max_new_tokens,
                     block_size=c.model.block_size, temperature=s.temperature, top_k=s.top_k,
                     seed=s.seed)
      print(f"--- sample after step {result.step} ---\n{tokenizer.decode(out)}\n---", flush=True)


def on_every_host(model: nnx.Module, mesh) -> nnx.Module:
  """The model with whole parameters in this host's memory, so one process can sample alone.
  With several processes this gathers the shards: every process must call it."""
  if jax.process_count() == 1:
    return model
  params = nnx.state(model, nnx.Param)
  gathered = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(params)
  nnx.update(model, jax.tree.map(np.asarray, gathered))
  return model


if __name__ == "__main__":
  run(main)
