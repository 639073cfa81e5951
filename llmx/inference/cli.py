"""The decoding flags of the entry points (experiments/generate.py, translate.py): defined once,
the same names everywhere. `define_flags` registers them when an entry point calls it, before
absl parses the command line (nothing is registered on import); `options` reads them back as
`decode`'s keyword arguments, checked."""
from llmx.inference.decode import SAMPLING_OFF, check_options
from llmx.inference.prompts import DecodingError

DEFAULTS = dict(max_new_tokens=200, max_length=0, temperature=0.8, top_k=0, top_p=1.0, min_p=0.0,
                repetition_penalty=1.0, stop=[], seed=0, beam_size=1, length_penalty=0.6,
                early_stopping=False)


def define_flags(flag_values=None, **defaults):
  """Registers the decoding flags in flag_values (default: absl's FLAGS); `defaults` overrides
  their default values (a translation entry point: beam_size=4, temperature=0,
  max_new_tokens=None)."""
  from absl import flags
  flag_values = flags.FLAGS if flag_values is None else flag_values
  unknown = set(defaults) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"no decoding flag named {', '.join(sorted(unknown))}")
  d = dict(DEFAULTS, **defaults)
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer("max_new_tokens", d["max_new_tokens"], "New tokens per row at most "
                       "(unset, translating: 2 * source length + 10).", **fv)
  flags.DEFINE_integer("max_length", d["max_length"], "Tokens in all per row, prompt included; "
                       "0: no limit.", **fv)
  flags.DEFINE_integer("beam_size", d["beam_size"], "Beams; 1: sampling, or greedy with "
                       "--temperature=0.", **fv)
  flags.DEFINE_float("length_penalty", d["length_penalty"], "Beam search: GNMT length penalty "
                     "alpha (score = log-prob / ((5 + length) / 6) ** alpha); 0: none.", **fv)
  flags.DEFINE_bool("early_stopping", d["early_stopping"], "Beam search: a row stops as soon "
                    "as it has beam_size finished hypotheses.", **fv)
  flags.DEFINE_float("temperature", d["temperature"], "Sampling temperature; 0 is greedy.", **fv)
  flags.DEFINE_integer("top_k", d["top_k"], "Sample among the k most likely tokens; 0: all.", **fv)
  flags.DEFINE_float("top_p", d["top_p"], "Sample among the most likely tokens holding this "
                     "much probability (nucleus); 1: all.", **fv)
  flags.DEFINE_float("min_p", d["min_p"], "Sample among the tokens at least this fraction as "
                     "likely as the most likely one; 0: all.", **fv)
  flags.DEFINE_float("repetition_penalty", d["repetition_penalty"], "Divide (multiply, when "
                     "negative) the logit of each token already in the row by this; 1: none.",
                     **fv)
  flags.DEFINE_multi_string("stop", d["stop"], "Text of a token that ends a row (kept); "
                            "repeatable. Backslash escapes such as \\n are understood.", **fv)
  flags.DEFINE_integer("seed", d["seed"], "Sampling seed: same seed, same text.", **fv)


def options(flag_values=None) -> dict:
  """The decoding flags as `decode`'s keyword arguments (stop tokens apart: `stop_tokens`),
  checked: a bad value raises DecodingError naming its flag. Under beam search the sampling
  flags left at their defaults are dropped; one given explicitly is an error."""
  from absl import flags
  f = flags.FLAGS if flag_values is None else flag_values
  out = dict(max_new_tokens=f.max_new_tokens, max_length=f.max_length or None,
             beam_size=f.beam_size, length_penalty=f.length_penalty,
             early_stopping=f.early_stopping, seed=f.seed)
  out.update({name: f[name].value for name in SAMPLING_OFF})
  if f.beam_size > 1:
    out = {k: v for k, v in out.items() if k not in SAMPLING_OFF or f[k].present}
  check_options(**dict(out, max_new_tokens=out["max_new_tokens"] or 0))
  return out


def stop_tokens(tokenizer, flag_values=None) -> tuple[int, ...]:
  """--stop texts -> token ids; each must be exactly one token under `tokenizer`."""
  from absl import flags
  ids = []
  for stop in (flags.FLAGS if flag_values is None else flag_values).stop:
    text = stop.encode("utf-8").decode("unicode_escape") if "\\" in stop else stop
    encoded = tokenizer.encode(text)
    if len(encoded) != 1:
      raise DecodingError(f"--stop={stop!r} is {len(encoded)} tokens under this run's "
                          f"tokenizer; a stop must be exactly one token")
    ids.append(int(encoded[0]))
  return tuple(ids)


# Generations longer than this report their progress on stderr while they run.
PROGRESS_FROM_TOKENS = 1024


def progress(options: dict, every_s: float = 5.0):
  """An `on_token` callback that prints `generated N / M tokens` to stderr every `every_s`
  seconds, for long generations (None for short ones and beam search, which settles its tokens
  only at the end)."""
  import sys
  import time
  total = options["max_new_tokens"]
  if total < PROGRESS_FROM_TOKENS or options.get("beam_size", 1) > 1:
    return None
  state = dict(count=0, last=time.perf_counter())

  def on_token(tokens, active):
    del tokens, active
    state["count"] += 1
    now = time.perf_counter()
    if now - state["last"] >= every_s:
      state["last"] = now
      print(f"generated {state['count']:,} / {total:,} tokens", file=sys.stderr, flush=True)
  return on_token
