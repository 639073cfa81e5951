"""Context parallelism on llama_tiny: losses, per-device memory and speed, context=1 vs C.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.context_parallel \
      --seq 2048 --batch 2 --steps 20 --contexts 1,4

Builds llama_tiny (experiments/configs/lm.py) with block_size = --seq on Tiny Shakespeare
($LLMX_DATA_DIR) through the LM recipe, and trains it with the recipe's own train step on the
same batches once per mesh: context=1 on one device, context=C on C devices (mesh data=1,
context=C), for each --attention ("ring", "all_gather"). Prints every step's loss beside the
context=1 loss, and per device the compiled train step's temp bytes (XLA's memory analysis:
the activations and scratch) and its peak (arguments + outputs + temp - aliased), and the median
step time after --steps steps as tokens/s. On simulated CPU devices (all sharing this machine's
cores) the timings are indicative only: they show the communication and layout overhead, not a
speed-up. --json FILE also writes the figures.
"""
import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llmx.data.lm_windows import lm_batches
from llmx.families.lm import recipe
from llmx.train import sharding
from llmx.train.mesh import batch_sharding, make_mesh


def llama_tiny(seq: int, batch: int, context: int, attention: str):
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "configs", "lm.py")
  spec = importlib.util.spec_from_file_location("_lm_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("llama_tiny")
  data_dir = os.environ.get("LLMX_DATA_DIR", "")
  c.data.path = os.path.join(data_dir, "tinyshakespeare.txt") if data_dir else ""
  c.model.block_size, c.train.batch_size = seq, batch
  c.model.context_attention = attention
  c.mesh.update(data=1, context=context)
  return c


def run(c, steps: int) -> dict:
  """Trains `steps` steps of config `c` on its first mesh.context devices -> {losses, temp and
  peak bytes per device, ms per step}."""
  recipe.validate(c)
  context = c.mesh.context
  mesh = make_mesh(data=1, context=context, devices=jax.devices()[:context])
  _, train_tokens, _ = recipe.load_tokens(c)
  gpt_config = recipe.model_config(c, vocab_size=2048)
  trainable, _ = recipe.trainable(c, gpt_config, mesh)
  abstract = jax.eval_shape(trainable.init)
  state_sharding = sharding.state_shardings(abstract, mesh)
  state = jax.jit(trainable.init, out_shardings=state_sharding)()
  data = lm_batches(train_tokens, block_size=c.model.block_size, batch_size=c.train.batch_size,
                    seed=0)
  put = lambda b: jax.device_put(np.asarray(b), batch_sharding(mesh))
  step = jax.jit(trainable.train_step, in_shardings=(state_sharding, batch_sharding(mesh)),
                 out_shardings=(state_sharding, NamedSharding(mesh, P())), donate_argnums=0)
  compiled = step.lower(state, put(data[0])).compile()
  memory = compiled.memory_analysis()
  losses, times = [], []
  for i in range(steps):
    batch = put(data[i])
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    losses.append(float(metrics["train_loss"]))  # waits for the step
    times.append(time.perf_counter() - start)
  ms = 1e3 * statistics.median(times[1:] or times)
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return dict(losses=losses, temp_bytes=int(memory.temp_size_in_bytes), peak_bytes=int(peak),
              ms_per_step=ms, tokens_per_s=c.train.batch_size * c.model.block_size / ms * 1e3)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--contexts", default="1,4", help="context sizes; the first is the baseline")
  parser.add_argument("--attention", default="ring", help="ring, all_gather or both: ring,all_gather")
  parser.add_argument("--json", default="", help="also write the figures to this file")
  args = parser.parse_args()
  contexts = [int(x) for x in args.contexts.split(",")]
  results = {}
  for attention in args.attention.split(","):
    for context in contexts:
      if context == 1 and any(k.startswith("1-") for k in results):
        continue  # context=1 has no cross-shard attention: one baseline for all
      name = f"{context}-{attention}" if context > 1 else "1-"
      results[name] = run(llama_tiny(args.seq, args.batch, context, attention), args.steps)
  base = results["1-"]
  print(f"llama_tiny, seq {args.seq}, batch {args.batch}, {args.steps} steps, jax "
        f"{jax.__version__}, {jax.devices()[0].device_kind} (simulated devices share the cores)")
  print(f"{'mesh':<22}{'temp MiB/dev':>13}{'ratio':>7}{'peak MiB/dev':>13}{'tokens/s':>10}"
        f"{'max |loss - ctx1|':>19}")
  for name, r in results.items():
    context, attention = name.split("-")
    label = f"context={context} {attention}".strip()
    diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
    print(f"{label:<22}{r['temp_bytes'] / 2**20:>13.2f}{r['temp_bytes'] / base['temp_bytes']:>7.3f}"
          f"{r['peak_bytes'] / 2**20:>13.2f}{r['tokens_per_s']:>10,.0f}{diff:>19.2e}")
  others = [n for n in results if n != "1-"]
  print("step  " + "  ".join(f"{n:>16}" for n in ["1-"] + others))
  for i in range(args.steps):
    print(f"{i + 1:>4}  " + "  ".join(f"{results[n]['losses'][i]:>16.7f}" for n in ["1-"] + others))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
