"""The bench/autotune tool on CPU: tiny runs, the cross-entropy memory check, the cache, errors."""
import json
import sys

import jax.numpy as jnp
import pytest

from llmx_kernels import autotune
from llmx_kernels.bench import roofline, spec
from llmx_kernels.bench.__main__ import main
from llmx_kernels.bench.tune import autotune_op
from llmx_kernels.cross_entropy import bench_spec as lce_bench
from llmx_kernels.norms import triton as norms_triton


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_softmax_rows_on_cpu(tmp_path, capsys):
  out = tmp_path / "rows.jsonl"
  rc = main(["--op=softmax", "--shapes=8x1000", "--implementations=xla,triton",
                   "--mode=fwd_bwd", "--dtype=f32", "--reps=2", "--warmup=1", f"--json={out}"])
  assert rc == 0
  text = capsys.readouterr().out
  assert "timings are not kernel timings" in text
  assert "interpret (not a kernel timing)" in text and "XLA:CPU" in text
  rows = _rows(out)
  assert [r["impl"] for r in rows] == ["xla", "triton"]
  for r in rows:
    assert "error" not in r, r
    assert r["median_s"] > 0 and r["gbps"] > 0 and r["tflops"] > 0
    assert r["temp_bytes"] is not None
    assert r["max_rel_err"] < 1e-5  # float32 against the float32 reference
  assert rows[1]["interpret"] and not rows[0]["interpret"]
  assert rows[0]["bytes"] == 8 * 1000 * 4 * 5  # read x, write p; read p, g, write dx


def test_cross_entropy_rows_and_memory_line(capsys):
  rc = main(["--op=linear_cross_entropy", "--shapes=64x16x2000", "--dtype=f32",
                   "--implementations=xla,xla_chunked", "--mode=fwd_bwd", "--reps=1",
                   "--warmup=1", "--json=-"])
  assert rc == 0
  text = capsys.readouterr().out
  assert "# memory 64x16x2000: xla_chunked / xla temp =" in text
  rows = [json.loads(l) for l in text.splitlines() if l.startswith("{")]
  assert {r["impl"] for r in rows} == {"xla", "xla_chunked"}
  assert all(r["max_rel_err"] < 1e-5 and r["flops"] == 6 * 64 * 16 * 2000 for r in rows)


def test_memory_check_ratio(capsys):
  """N=8192, D=512, V=32768 float32: chunked fwd+bwd needs <= 1/16 of the naive temp memory."""
  res = lce_bench.memory_check()
  assert res["shape"] == [8192, 512, 32768] and res["dtype"] == "float32"
  assert res["xla"] >= 8192 * 32768 * 4  # the naive version holds [N, V] float32 logits
  assert res["ratio"] <= 1 / 16 and res["ok"]
  assert main(["--memory-check"]) == 0
  text = capsys.readouterr().out
  assert "required <= 1/16: OK" in text and "xla_chunked" in text


def test_autotune_writes_cache_and_op_reads_it(tmp_path, monkeypatch):
  cache = tmp_path / "autotune.json"
  monkeypatch.setenv(autotune.CACHE_ENV, str(cache))
  dims, dtype = (6, 300), jnp.float32
  winners = autotune_op("rms_norm", dims, dtype, interpret=True, max_configs=1, warmup=0,
                        reps=1, log=lambda *a: None)
  assert set(winners) == {"fwd", "bwd"}
  entries = json.loads(cache.read_text())["entries"]
  key = f"{autotune.device_kind()}|rms_norm.fwd|8x512|float32"
  assert entries[key]["config"] == winners["fwd"]
  # The op picks the cached config up at trace time (same bucket, other shape) ...
  cfg = dict(winners["bwd"], block_rows=4, row_groups=7)
  autotune.record("rms_norm.bwd", dims, dtype, cfg)
  assert norms_triton.resolve_config("rms_norm", "bwd", (7, 290), dtype) == cfg
  # ... and falls back to the heuristic for other buckets, dtypes and broken entries.
  heur = norms_triton.heuristic_config("bwd", (7, 2000), dtype)
  assert norms_triton.resolve_config("rms_norm", "bwd", (7, 2000), dtype) == heur
  autotune.record("rms_norm.bwd", dims, dtype, {**cfg, "block_rows": 3})  # not a power of 2
  assert norms_triton.resolve_config("rms_norm", "bwd", dims, dtype) == \
      norms_triton.heuristic_config("bwd", dims, dtype)


def test_autotune_cli_on_cpu(tmp_path, capsys):
  cache = tmp_path / "c.json"
  rc = main(["--op=softmax", "--shapes=4x100", "--implementations=triton", "--autotune",
                   f"--cache={cache}", "--max-configs=1", "--reps=1"])
  assert rc == 0
  assert "winners mean nothing for a GPU" in capsys.readouterr().out
  keys = json.loads(cache.read_text())["entries"]
  assert {k.split("|")[1] for k in keys} == {"softmax.fwd", "softmax.bwd"}


def test_lower_cli(capsys):
  assert main(["--op=layer_norm", "--lower", "--shapes=100x1000", "--mode=fwd_bwd"]) == 0
  assert "2 Triton custom call(s)" in capsys.readouterr().out


def test_attention_rows(capsys):
  rc = main(["--op=attention", "--shapes=1x64x2x16", "--implementations=xla",
                   "--dtype=f32", "--reps=1"])
  assert rc == 0
  assert "attention  xla" in capsys.readouterr().out


def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
  rc = main(["--op=rms_norm", "--shapes=4x16", "--implementations=xla", "--reps=1",
                   f"--plot={tmp_path / 'p.png'}"])
  assert rc == 2
  assert "--plot needs matplotlib" in capsys.readouterr().err


def test_roofline_table():
  assert roofline.lookup("NVIDIA H100 80GB HBM3").name == "H100 SXM"
  assert roofline.lookup("NVIDIA H200").hbm_gbps == 4800.0
  assert roofline.lookup("NVIDIA A100-SXM4-40GB").name == "A100 40GB"
  assert roofline.lookup("TPU v5 lite").name == "TPU v5e"
  assert roofline.lookup("TPU v6 lite").name == "TPU v6e"
  assert roofline.lookup("TPU v4").name == "TPU v4"
  assert roofline.lookup("TPU v5p").name == "TPU v5p"
  assert roofline.lookup("NVIDIA L40S").name == "L40S"  # not L4: longer patterns come first
  assert roofline.lookup("cpu") is None
  assert roofline.peak_tflops(roofline.lookup("NVIDIA H100 80GB HBM3"), jnp.bfloat16) == 989.0


def test_every_op_spec_lives_beside_its_op():
  for name in spec.names():
    op = spec.get(name)
    assert op.name == name and op.implementations[0] == "xla"
    assert spec.SPEC_MODULES[name].endswith(".bench_spec")
    for dims in op.default_shapes:
      assert spec.parse_shapes(op, dims) == [tuple(int(d) for d in dims.split("x"))]


@pytest.mark.parametrize("argv,message", [
    (["--op=matmul"], "invalid choice: 'matmul'"),
    (["--op=softmax", "--implementations=xla,cuda"],
     "unknown implementation 'cuda' for --op=softmax; choose from xla, triton"),
    (["--op=linear_cross_entropy", "--shapes=8x16"], "'8x16' for --op=linear_cross_entropy must be NxDxV"),
    (["--op=softmax", "--dtype=int8"], "invalid choice: 'int8'"),
    (["--op=softmax", "--mode=bwd"], "invalid choice: 'bwd'"),
    ([], "--op is required"),
])
def test_bad_arguments(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


# ---------------------------------------------------------------- gpu_report (CPU: dry run)

def _jax_at_least_0_11():
  import jax
  return tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11)


def test_gpu_report_dry_run_lists_the_plan(tmp_path, capsys):
  """The dry run lists every op x implementation x shape x mode, lowers the Pallas kernels of
  one op for cuda, runs its Mosaic GPU interpret numerics (or says JAX < 0.11 cannot) and
  writes the plan; exit 0 on every JAX."""
  rc = main(["gpu_report", f"--out={tmp_path}", "--dry_run", "--check_ops=rms_norm",
             "--interpret_budget_s=40"])
  text = capsys.readouterr().out
  assert rc == 0
  plan = (tmp_path / "gpu_report_plan.md").read_text()
  for row in ("| attention | fwd | causal hd128 | 2x8192x16x128 | mosaic_gpu | TFLOP/s |",
              "| attention | fwd_bwd | full hd64 | 1x16384x32x64 | cudnn | TFLOP/s |",
              "| attention | fwd_bwd | causal hd128 | 32x512x16x128 | xla | TFLOP/s |",
              "| softmax | fwd_bwd | - | 4096x50257 | mosaic_gpu | GB/s |",
              "| layer_norm | fwd | - | 16384x4096 | triton | GB/s |",
              "| rms_norm | fwd_bwd | - | 8192x12288 | xla | GB/s |",
              "| linear_cross_entropy | fwd_bwd | - | 16384x2048x50257 | mosaic_gpu | "
              "GB/s+TFLOP/s |"):
    assert row in plan, row
  lines = [json.loads(l) for l in (tmp_path / "gpu_report_plan.jsonl").read_text().splitlines()]
  planned = [r for r in lines if r.get("plan")]
  # attention: 6 seqs x 2 head dims x 2 masks x 2 modes x 4 impls; 4 memory ops x shapes x 2 x 3
  assert len(planned) == 192 + (3 + 3 + 3 + 2) * 2 * 3 == 258
  assert "plan: 258 cells" in text
  lower = [r for r in lines if r.get("kind") == "lower"]
  assert {(r["impl"], r["mode"]) for r in lower} == {
      (i, m) for i in ("triton", "mosaic_gpu") for m in ("fwd", "fwd_bwd")}
  assert all(r["status"] == "ok" for r in lower if r["impl"] == "triton"), lower
  mgpu = [r for r in lower if r["impl"] == "mosaic_gpu"]
  interp = [r for r in lines if r.get("kind") == "interpret"]
  assert len(interp) == 1 and interp[0]["op"] == "rms_norm"
  if _jax_at_least_0_11():
    assert all(r["status"] == "ok" and r["kernels"] >= 1 and r["threads"][0] >= 128
               for r in mgpu), mgpu
    assert interp[0]["check"] in ("pass", "skip"), interp
  else:
    assert "Mosaic GPU rows need JAX >= 0.11" in plan
    assert all(r["status"] == "n/a" and "JAX >= 0.11" in r["error"] for r in mgpu)
    assert interp[0]["check"] == "n/a"


def test_gpu_report_needs_a_gpu_without_dry_run(tmp_path, capsys):
  assert main(["gpu_report", f"--out={tmp_path}"]) == 2
  assert "--dry_run" in capsys.readouterr().err


def test_gpu_report_tables():
  """The report's markdown from measured cells (no GPU needed): values, % of the measured
  ceilings, numbered notes for failures, the numerics marker."""
  from llmx_kernels.bench import gpu_plan, gpu_tables
  att = gpu_plan.Entry("attention", "mosaic_gpu", "fwd", gpu_plan.attention_dims(4096, 128), True)
  xla = gpu_plan.Entry("attention", "xla", "fwd", att.dims, True)
  sm = gpu_plan.Entry("softmax", "triton", "fwd_bwd", (8192, 8192))
  ce = gpu_plan.Entry("linear_cross_entropy", "xla", "fwd", (8192, 1024, 32768))
  ok = dict(status="ok", median_s=1e-3, compile_s=1.0, tflops=500.0, gbps=3000.0,
            pct_matmul=62.5, pct_copy=75.0, check="pass")
  att_fb = gpu_plan.Entry("attention", "mosaic_gpu", "fwd_bwd", att.dims, True)
  cells = {att: dict(ok, check="FAIL", flops=1e12), xla: {"status": "error", "error": "OOM"},
           sm: ok, ce: {"status": "skip", "error": "time budget"},
           att_fb: dict(ok, median_s=6e-3, flops=3.5e12)}
  checks = {("attention", "mosaic_gpu", att.variant, "fwd_bwd"): {"check": "FAIL",
                                                                  "rel_err": 0.5,
                                                                  "xla_bf16_rel_err": 0.004}}
  md = "\n".join(gpu_tables.report_markdown(
      [att, xla, att_fb, sm, ce], cells, checks, {"matmul_tflops": 800.0, "copy_gbps": 4000.0},
      ["jax x"]))
  assert "| 4096 | 128 | causal | 4x4096x16x128 | err[1] | - | - | 500.0 (62%) !num |" in md
  assert "| softmax | fwd_bwd | 8192x8192 | - | 3000 (75%) | - |" in md
  assert "| linear_cross_entropy | fwd | 8192x1024x32768 | skip (time) | - | - |" in md
  # backward alone: (3.5 - 1) TFLOP / (6 - 1) ms = 500 TFLOP/s, 62% of 800
  assert "| 4096 | 128 | causal | 4x4096x16x128 | - | - | - | 500.0 (62%) |" in md
  assert "1. OOM" in md and "bf16 matmul 800.0 TFLOP/s, copy 4000 GB/s" in md
  assert "| attention | causal hd128 | fwd_bwd | mosaic_gpu | 5.00e-01 | 4.00e-03 | FAIL |" in md


def test_autotune_mosaic_gpu_writes_cache(tmp_path):
  """The Mosaic GPU sweep (here in the GPU interpreter) records under the kernel's own key."""
  cache = tmp_path / "c.json"
  logs = []
  winners = autotune_op("rms_norm", (64, 256), jnp.bfloat16, impl="mosaic_gpu", interpret=True,
                        cache_path=cache, max_configs=1, warmup=0, reps=1, log=logs.append)
  if not _jax_at_least_0_11():
    assert winners == {} and "needs JAX >= 0.11" in logs[0]
    return
  assert set(winners) == {"rms_norm.mosaic_gpu.fwd", "rms_norm.mosaic_gpu.bwd"}, logs
  keys = json.loads(cache.read_text())["entries"]
  assert f"{autotune.device_kind()}|rms_norm.mosaic_gpu.fwd|64x256|bfloat16" in keys
