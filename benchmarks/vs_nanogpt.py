"""llmx beside nanoGPT (PyTorch) on CPU: train-step time and tokens/s, side by side in one run.

  python benchmarks/vs_nanogpt.py --data=$LLMX_DATA_DIR/tinyshakespeare.txt \
      --torch_python=/path/to/venv-with-torch/bin/python \
      --llmx_python=.venv/bin/python,.venv312/bin/python

Two sizes: "baby" (nanoGPT's CPU command: 4 layers x 128, batch 12 x 64, dropout 0) and
"default" (its train_shakespeare_char.py model: 6 layers x 384, batch 64 x 256, dropout 0.2).
For each size the script makes `--repeats` passes; a pass runs nanoGPT's step
(benchmarks/nanogpt_torch.py, float32 as nanoGPT runs on a CPU) and then llmx's
(experiments.bench_train_step) under each `--llmx_python` with each `--matmul_dtypes`, every one
in a fresh process, so the machine's drift (tens of percent within minutes on a shared machine)
falls on all of them alike. Each line reports the median ms/step over the passes (each pass
itself the median of its rounds), tokens/s and the speed ratio to nanoGPT (torch ms / llmx ms;
the first --torch_autocast value is the baseline).

torch runs with the allocator settings llmx's entry points set through mallopt
(llmx/train/launch.py: freed memory stays in the process); with glibc's defaults torch pays page
faults every step and runs 1.4-1.7x slower here, which would flatter llmx. Run it on an
otherwise idle machine: it uses every core it is given.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    # size: (tokens per step, llmx overrides, nanogpt_torch.py --size, steps, rounds, warm-up)
    "baby": (12 * 64, ["--config=experiments/configs/lm.py:nanogpt_baby"], "baby", 50, 3, 5),
    "default": (64 * 256, [
        "--config=experiments/configs/lm.py", "--config.model.n_layer=6",
        "--config.model.n_head=6", "--config.model.d_model=384",
        "--config.model.block_size=256", "--config.model.dropout=0.2",
        "--config.model.bias=False", "--config.train.batch_size=64"], "default", 2, 2, 2),
}
TORCH_ALLOCATOR = ("glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295:"
                   "glibc.malloc.top_pad=67108864")


def _run(command: list[str], pattern: str, env: dict) -> tuple[float, str]:
  """-> (the ms/step the command printed, its first line naming versions)."""
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
  match = re.search(pattern, done.stdout)
  if done.returncode or not match:
    sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-2000:]}"
             f"{done.stderr[-3000:]}")
  first = done.stdout.splitlines()[0]
  return float(match.group(1)), first


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", required=True, help="Tiny Shakespeare input.txt")
  p.add_argument("--torch_python", required=True, help="a Python with torch installed")
  p.add_argument("--torch_autocast", default="off",
                 help="nanogpt_torch.py --autocast values to run (off: float32, the baseline; "
                      "bfloat16: nanoGPT's GPU autocast, for a bf16-to-bf16 comparison)")
  p.add_argument("--llmx_python", default=sys.executable,
                 help="comma-separated Pythons with llmx installed (e.g. one per JAX version)")
  p.add_argument("--matmul_dtypes", default="float32,bfloat16",
                 help="llmx model.matmul_dtype values to run")
  p.add_argument("--sizes", default="baby,default", help=f"of {', '.join(SIZES)}")
  p.add_argument("--repeats", type=int, default=2, help="alternating passes per size")
  args = p.parse_args()
  env = dict(os.environ)
  torch_env = dict(env, GLIBC_TUNABLES=TORCH_ALLOCATOR)
  pythons = args.llmx_python.split(",")
  dtypes = args.matmul_dtypes.split(",")
  sizes = args.sizes.split(",")
  for size in sizes:  # all checked before the first (long) run
    if size not in SIZES:
      p.error(f"--sizes: {size!r} is not one of {', '.join(SIZES)}")
  for size in sizes:
    tokens, overrides, torch_size, steps, rounds, warmup = SIZES[size]
    times: dict[str, list[float]] = {}
    names = {}
    for repeat in range(args.repeats):
      for autocast in args.torch_autocast.split(","):
        ms, first = _run([args.torch_python, "benchmarks/nanogpt_torch.py", f"--data={args.data}",
                          "--mode=time", f"--size={torch_size}", f"--steps={steps}",
                          f"--rounds={rounds}", f"--warmup={warmup}", f"--autocast={autocast}"],
                         r"median ([\d.]+) ms/step", torch_env)
        key = f"torch:{autocast}"
        times.setdefault(key, []).append(ms)
        version = re.search(r"torch \S+", first).group(0).rstrip(",")
        names[key] = f"nanoGPT {version}" + ("" if autocast == "off" else f", autocast {autocast}")
        print(f"[{size} pass {repeat + 1}] {names[key]}: {ms:.2f} ms/step", flush=True)
      for python in pythons:
        for dtype in dtypes:
          ms, first = _run([python, "-m", "experiments.bench_train_step", *overrides,
                            f"--config.data.path={args.data}",
                            f"--config.model.matmul_dtype={dtype}",
                            f"--steps={steps}", f"--rounds={rounds}", f"--warmup={warmup}"],
                           r"ms/step \(median\): ([\d.]+)", env)
          key = f"{python}:{dtype}"
          times.setdefault(key, []).append(ms)
          jax_version = re.search(r"jax (\S+)", first).group(1)
          names[key] = f"llmx jax {jax_version}, matmuls {dtype}"
          print(f"[{size} pass {repeat + 1}] {names[key]}: {ms:.2f} ms/step", flush=True)
    torch_ms = statistics.median(times[f"torch:{args.torch_autocast.split(',')[0]}"])
    print(f"\n{size}: {tokens} tokens/step, median of {args.repeats} alternating passes")
    print(f"  {'run':44s} {'ms/step':>10s} {'tokens/s':>10s} {'vs nanoGPT':>11s}  passes (ms)")
    for key, runs in times.items():
      ms = statistics.median(runs)
      print(f"  {names[key]:44s} {ms:10.2f} {tokens / ms * 1e3:10,.0f} {torch_ms / ms:10.2f}x  "
            f"{', '.join(f'{r:.1f}' for r in runs)}")
    print(flush=True)


if __name__ == "__main__":
  main()
