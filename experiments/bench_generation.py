r"""Times greedy generation with the KV cache against the uncached loop, and checks they agree.

  python -m experiments.bench_generation --config=experiments/configs/lm.py:nanogpt_baby \
      --new_tokens=512
  python -m experiments.bench_generation --workdir=/tmp/baby   # a trained model instead

The model is the config's (randomly initialised, with block_size = prompt + new tokens so both
paths stay inside the context) or the one in --workdir. The uncached loop re-reads the whole
context window through the model for every new token; the cached one runs one prefill, then one
token per step against the cache. Both are compiled before timing; each is timed over several
rounds and the median reported (the machine is shared and drifts).
"""
import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from llmx.families.lm import recipe as lm_recipe
from llmx.train.launch import run
from llmx.inference import DecodingError
from llmx.inference.bench import cached_vs_uncached

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/lm.py:nanogpt_baby", "LM config.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Run folder of a trained model; empty: a random "
                               "model of --config.")
_NEW = flags.DEFINE_integer("new_tokens", 512, "Tokens to generate.")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 16, "Prompt length (random tokens).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per path; the median is reported.")


def main(argv):
  del argv
  if _WORKDIR.value:
    model, _, _, _ = lm_recipe.load_run(_WORKDIR.value)
  else:
    c = _CONFIG.value
    c.model.block_size = _PROMPT.value + _NEW.value
    lm_recipe.validate(c)
    model = lm_recipe.build_model(lm_recipe.model_config(c, vocab_size=c.data.vocab_size
                                                       if c.data.tokenizer == "bpe" else 65), 0)
    model.eval()
  context = model.config.block_size
  if _PROMPT.value + _NEW.value > context:
    raise DecodingError(f"prompt_tokens + new_tokens = {_PROMPT.value + _NEW.value} exceeds the "
                     f"model's block_size={context}")
  prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, _PROMPT.value)
  prompt = prompt.astype(np.int32)

  r = cached_vs_uncached(model, prompt, new_tokens=_NEW.value, rounds=_ROUNDS.value)
  print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}")
  print(f"model: {model.config.n_layer} layers x {model.config.d_model}, context {context}, "
        f"vocab {model.config.vocab_size}; prompt {_PROMPT.value} tokens, {_NEW.value} new, greedy")
  print(f"uncached: {r['uncached_s']:.3f} s  ({_NEW.value / r['uncached_s']:,.0f} tokens/s)")
  print(f"cached:   {r['cached_s']:.3f} s  ({_NEW.value / r['cached_s']:,.0f} tokens/s)")
  print(f"speed-up: {r['speedup']:.1f}x")
  print(f"identical tokens: {r['identical']}" + ("" if r["identical"] else
                                                  f" (first difference at {r['first_difference']})"))


if __name__ == "__main__":
  run(main)
