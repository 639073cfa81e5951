"""Benchmark, check and autotune the kernels: ``python -m kernels.bench --op=... ``.

Examples::

  python -m kernels.bench --op=softmax --shapes=4096x1000,4096x50257 --dtype=bf16 --mode=fwd_bwd
  python -m kernels.bench --op=linear_cross_entropy --shapes=8192x512x32768 --autotune
  python -m kernels.bench --op=layer_norm --implementations=xla,triton --plot=ln.png --json=ln.jsonl
  python -m kernels.bench --memory-check          # xla vs xla_chunked cross-entropy memory
  python -m kernels.bench --op=rms_norm --lower   # lower the Triton kernels for CUDA from CPU
  python -m kernels.bench gpu_report --out=results/gpu [--dry_run] [--autotune]

Per implementation and shape it prints the median time (device-synchronised, after
warm-up), TFLOP/s and GB/s from each op's analytic FLOP and byte counts, the percent of
the device's peak on the bound that applies (compute or bandwidth, from
``kernels/bench/roofline.py``, or measured with ``--measure-ceiling``), the max error against
the float32 reference (relative to its largest magnitude; also absolute in the JSON),
and the compiled temporary memory (plus the device's peak bytes in use where the
backend reports it). ``--json`` writes the rows as JSON lines and
``--plot`` a PNG of throughput against problem size (needs matplotlib).

FLOP counts are algorithmic: the cross-entropy backward's logits recomputation and
attention's masked half are not counted. Shapes: softmax ``RxC`` (rows x row length),
norms ``NxD``, linear_cross_entropy ``NxDxV``, attention ``BxTxHxD`` (batch, sequence,
heads, head dim; causal).

On CPU the xla rows time XLA:CPU, the triton rows run in Pallas interpret mode and the
mosaic_tpu rows in Pallas's TPU interpreter, for correctness: none is a kernel timing. On a
TPU the mosaic_tpu rows are the Mosaic kernels (roofline peaks for v4, v5e, v5p, v6e in
``kernels/bench/roofline.py``); rows a platform cannot run (triton on TPU, mosaic_tpu on GPU)
report an error instead of a time. ``--autotune`` sweeps each Triton kernel's
block sizes, warps and stages (and each Mosaic GPU kernel's ``autotune_candidates``) and stores
the winners in the autotune cache (see ``kernels/autotune.py``; ``--cache`` picks the file).

``gpu_report`` is the one-command GPU report (all ops x implementations, ceilings, numerics,
markdown + JSON lines, < 8 minutes on one H200); ``--dry_run`` lists its plan and lowers the
Pallas kernels for cuda on a CPU.

The harness, shared by every op:

* ``spec.py``: ``OpSpec``, what an op tells the harness, and which module holds each op's
  (``kernels/<op>/bench_spec.py``, beside the op's kernels);
* ``timing.py``: one row: compile, time, error against the reference, compiled memory;
* ``roofline.py``: device peaks and percent of peak;
* ``tables.py``: the text table, JSON lines, the plot;
* ``tune.py``: the autotuning sweep over an op's Triton and Mosaic GPU configs;
* ``gpu_report.py`` (the GPU run), ``gpu_plan.py`` (what it measures), ``gpu_measure.py``
  (compile ahead, check, time), ``gpu_tables.py`` (markdown), ``gpu_dry_run.py`` (CPU checks);
* ``__main__.py``: the command line.

Adding an op: a ``bench_spec.py`` beside it with ``SPECS = {name: OpSpec(...)}`` and one
line in ``spec.SPEC_MODULES``.
"""
