r"""Times the LM train step of a config: ms/step, tokens/s and model FLOP utilisation.

  python -m experiments.bench_train_step --config=experiments/configs/lm.py:nanogpt_baby

The step is the one training runs (optimizer, model.dtype, model.remat, train.grad_accum_steps).
MFU divides the analytic model FLOPs (6N + attention, per token) by the step time and by a peak:
`--peak_tflops` if given (a GPU or TPU's spec sheet), else the measured rate of a large float32
matmul on this machine, so CPU figures are against what the cores really reach. Runs several
rounds and reports the median, since a shared machine drifts by tens of percent within minutes.
The step runs sharded over the config's mesh (`--config.mesh.context=4`: context parallelism),
and the compiled step's memory per device is printed.
"""
import statistics

import jax
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from llmx.data.lm_windows import lm_batches
from llmx.families.lm import model as gpt, recipe
from llmx.nn.params import num_params
from llmx.train import bench, metrics as metrics_lib
from llmx.train.launch import run
from llmx.train.mesh import mesh_from_config

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/lm.py:nanogpt_baby",
                                          "LM config.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds; the median round is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps first (the first one compiles).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s; 0: the spec sheet's "
                           "(accelerators) or a measured float32 matmul (CPU).")


def main(argv):
  del argv
  c = _CONFIG.value
  recipe.validate(c)
  _, train_tokens, _ = recipe.load_tokens(c)
  gpt_config = recipe.model_config(c, vocab_size=int(train_tokens.max()) + 1)
  mesh = mesh_from_config(c.mesh)  # context > 1: the sequence split over devices
  trainable, _ = recipe.trainable(c, gpt_config, mesh)
  data = lm_batches(train_tokens, block_size=c.model.block_size, batch_size=c.train.batch_size, seed=0)
  round_ms, metrics = bench.time_train_step(trainable, [data[i] for i in range(8)],
                                            steps=_STEPS.value, rounds=_ROUNDS.value,
                                            warmup=_WARMUP.value, mesh=mesh)
  memory = bench.step_memory(trainable, data[0], mesh)
  ms = statistics.median(round_ms)
  n_params = num_params(nnx.eval_shape(lambda: recipe.build_model(gpt_config, 0)), skip=("wpe",))
  n_active = recipe.active_params(gpt_config, n_params)  # MoE: the experts a token uses
  tokens = c.train.batch_size * c.model.block_size
  flops = tokens * gpt.flops_per_token(gpt_config, n_active, c.model.block_size)
  peak = _PEAK.value * 1e12 if _PEAK.value else metrics_lib.peak_flops(jax.devices())
  peak_kind = ("given peak" if _PEAK.value else
               "measured f32 matmul" if jax.devices()[0].platform == "cpu" else "spec sheet peak")
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}")
  print(f"model: {n_params / 1e6:.2f}M params ({n_active / 1e6:.2f}M active), batch {c.train.batch_size} x {c.model.block_size} "
        f"tokens, {c.model.dtype} (matmuls {c.model.matmul_dtype}), remat {c.model.remat}, {c.train.grad_accum_steps} micro-batches"
        f"{' (unrolled)' if c.train.get('grad_accum_unroll') and c.train.grad_accum_steps > 1 else ''}")
  print(f"mesh:             {dict(mesh.shape)}; per device: temp {memory['temp'] / 2**20:.1f} MiB, "
        f"peak {memory['peak'] / 2**20:.1f} MiB")
  print(f"rounds (ms/step): {', '.join(f'{r:.1f}' for r in round_ms)}")
  print(f"ms/step (median): {ms:.2f}")
  print(f"tokens/s:         {tokens / ms * 1e3:,.0f}")
  print(f"model GFLOP/step: {flops / 1e9:.3f}  achieved {flops / ms / 1e6:.1f} GFLOP/s")
  if peak:
    print(f"MFU:              {flops / (ms / 1e3) / peak:.1%} of {peak / 1e9:.0f} GFLOP/s "
          f"({peak_kind})")
  print(f"final loss:       {metrics['train_loss']:.4f}")
  assert np.isfinite(metrics["train_loss"])


if __name__ == "__main__":
  run(main)
