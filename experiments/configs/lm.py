"""Decoder-only language model pretraining (character level by default).

Launch:
  python -m experiments.pretrain_lm --config=experiments/configs/lm.py --workdir=/tmp/lm
  python -m experiments.pretrain_lm --config=experiments/configs/lm.py:nanogpt_baby \
      --config.data.path=$LLMX_DATA_DIR/tinyshakespeare.txt --workdir=/tmp/baby
  python -m experiments.generate --workdir=/tmp/baby --prompt="ROMEO:" --max_new_tokens=300

Variants:
  (default)     4 layers x 128 wide on the embedded corpus (CPython's documentation text), 1000
                steps. Hardware: 2 CPU cores, about 3 minutes (5 CPU-minutes). Expected: val loss 1.56.
  nanogpt_baby  nanoGPT's CPU "baby GPT" shakespeare-char run, like for like (4 layers, 4 heads,
                d 128, block 64, batch 12, no dropout, no biases, lr 1e-3 with 100 warm-up steps
                then cosine to 1e-4 over 2000 steps, AdamW betas (0.9, 0.99), weight decay 0.1,
                clip 1.0; the batch runs as two halves side by side, the same step, faster on 2
                cores). Hardware: 2 CPU cores, about 2 minutes (200 CPU-seconds). Expected on
                Tiny Shakespeare at step 2000: val_loss 1.89-1.90 on its 200 fixed batches, as
                nanoGPT's own code gets here; 1.87-1.90 on 20 batches, the noisy estimate behind
                nanoGPT's README figure of 1.88. See results/lm.md.
                `--config.model.matmul_dtype=bfloat16` (bf16 inputs to the dense layers'
                matmuls, float32 elsewhere): 1.902 / 1.905 (whole split) at seed 0 against
                float32's 1.901 / 1.9035, 1.3-1.6x faster per step on an AVX512-BF16 CPU.
  llama_tiny    the LLaMA-style switches all on: byte-level BPE (2048 tokens, trained on the
                training split), RoPE, RMSNorm, SwiGLU, grouped-query attention (4 heads, 2 KV
                heads), no biases, untied head, output logits soft-capped at 30; 4 layers x 128,
                block 64 tokens, batch 16, 600 steps. Hardware: 2 CPU cores, 1-5 minutes.
                Expected on Tiny Shakespeare: val 4.21 nats per BPE token, 2.37 bits per
                character from `python -m experiments.eval_lm --workdir=DIR` (its GPT-2-style
                twin at the same size and steps: 2.54); see results/llama_tiny.md.
    python -m experiments.pretrain_lm --config=experiments/configs/lm.py:llama_tiny \
        --config.data.path=$LLMX_DATA_DIR/tinyshakespeare.txt --workdir=/tmp/llama_tiny
  moe_tiny      llama_tiny's model with every MLP a mixture of 8 SwiGLU experts of hidden 192,
                top-2 softmax routing, dropless: as many active parameters per token as its dense
                twin `moe_tiny_dense` (llama_tiny, SwiGLU hidden 384); 3.09M parameters in all,
                1.32M active. Both 400 steps (warm-up 40, cosine to 1e-4 at 400), batch 16 x 64.
                Hardware: 2 CPU cores, about 5 minutes for moe_tiny (10 under a shared load),
                2-4 for the twin. Expected on Tiny Shakespeare at step 400: val_ce_loss
                4.46-4.47 (moe_tiny; val_loss adds the weighted aux losses) vs val_loss
                4.45-4.48 (the twin) over seeds 0 and 1: a tie, as Tiny Shakespeare limits by
                data, not capacity; expert loads within 0.76-1.3x the balanced share. In one
                pass over a larger corpus (eng-fra, char level, 1200 steps) the MoE is 0.045
                lower.
                See results/moe.md.
    python -m experiments.pretrain_lm --config=experiments/configs/lm.py:moe_tiny \
        --config.data.path=$LLMX_DATA_DIR/tinyshakespeare.txt --workdir=/tmp/moe_tiny
"""
import ml_collections

MOE_TINY_STEPS = 400


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      path="",                # a UTF-8 text file; empty: the embedded corpus
      val_fraction=0.1,       # the last characters of the text
      tokenizer="char",       # "char" or "bpe" (byte-level BPE)
      vocab_size=2048,        # bpe: vocabulary learned on the training split
      tokenizer_path="",      # bpe: a pretrained tokenizer.json instead of learning one
  ))
  c.model = ml_collections.ConfigDict(dict(
      n_layer=4, n_head=4, d_model=128, block_size=128, dropout=0.0,
      bias=True, tie_embeddings=True, gelu_approximate=False,
      attention_impl="",      # "": the kernel's default for the backend
      n_kv_head=0,            # 0: n_head (multi-head); fewer: grouped-query attention
      positions="learned",    # "learned" table or "rope"
      rope_theta=10000.0,
      norm="layernorm",       # or "rmsnorm"
      mlp="gelu",             # or "swiglu"
      mlp_hidden=0,           # 0: 4 * d_model (gelu), 8/3 * d_model rounded up to 64 (swiglu)
      logits_soft_cap=0.0,    # > 0: c * tanh(logits / c) on the output logits; 0: off
      attn_logits_soft_cap=0.0,  # the same on the attention logits
      dtype="float32",        # compute dtype ("bfloat16": mixed precision, params stay float32)
      matmul_dtype="float32",  # "bfloat16": matmul inputs rounded to bf16, float32 elsewhere
      remat="none",           # recompute activations in the backward pass: "none", "dots", "full"
      context_attention="ring",  # mesh.context > 1: "ring" (O(local) memory) or "all_gather"
  ))
  # Mixture of experts (llmx/nn/moe.py; BUILD.md "Mixture of experts"). Layer i (from 0) is MoE
  # when (i + 1) % every_n_layers == 0; experts are SwiGLU.
  c.model.moe = ml_collections.ConfigDict(dict(
      num_experts=0,          # 0: dense model
      top_k=2,                # experts per token
      every_n_layers=1,       # 1: every layer MoE; 2: every second layer
      gating="softmax",       # "softmax" (top k renormalised) or "sigmoid" (DeepSeek-V3)
      hidden=0,               # each expert's hidden width; 0: model.mlp_hidden's
      shared_expert=False,    # also a dense SwiGLU (of `hidden`) that every token passes through
      capacity_factor=0.0,    # 0: dropless (grouped matmul); > 0: cf * tokens * top_k / E per expert
      grouped_matmul="auto",  # dropless: "ragged_dot", "tiled" (CPU's choice) or "auto"
      aux_loss_weight=0.01,   # load-balancing loss (E * sum f_e p_e; 1.0 when balanced)
      z_loss_weight=0.001,    # router z-loss (mean logsumexp(logits)^2)
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=16, learning_rate=1e-3, min_learning_rate=1e-4,
      warmup_steps=100, lr_decay_steps=0,  # 0: decay over train.steps
      beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
      eval_every=250, eval_batches=50, checkpoint_every=500, log_every=50,
      max_checkpoints=3, seed=0,
      keep_best_metric="",    # "val_loss": also keep the checkpoint where it was lowest
      grad_accum_steps=1,     # micro-batches per step (batch_size is the whole step's batch)
      grad_accum_unroll=False,  # True: micro-batches side by side, not in a loop (CPU speed)
  ))
  # Devices: data x fsdp x tensor = all devices (one size -1: the rest). fsdp > 1 shards params and
  # optimizer state (FSDP), tensor > 1 also splits the big matrices (tensor parallelism).
  # Resuming with another batch size is refused unless this is True (a deliberate change).
  c.train.allow_batch_size_change = False
  # expert > 1 splits the MoE experts over that many devices (expert parallelism; it is
  # data-parallel outside the MoE layers) and must divide model.moe.num_experts.
  # context > 1 splits every sequence over that many devices (context parallelism, ring attention;
  # BUILD.md "Context parallelism"); 2 x context must divide model.block_size.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, context=1))
  c.sample = ml_collections.ConfigDict(dict(
      prompt="\n", max_new_tokens=300, temperature=0.8, top_k=0, seed=0))

  if variant in (None, ""):
    pass
  elif variant == "nanogpt_baby":
    c.model.update(n_layer=4, n_head=4, d_model=128, block_size=64, dropout=0.0, bias=False)
    c.train.update(steps=2000, batch_size=12, learning_rate=1e-3, min_learning_rate=1e-4,
                   warmup_steps=100, lr_decay_steps=2000, beta1=0.9, beta2=0.99,
                   weight_decay=0.1, grad_clip=1.0, eval_every=250, eval_batches=200,
                   checkpoint_every=500, log_every=50,
                   # The same step as one batch of 12, but the two halves' passes run on two
                   # cores at once: 7-8% faster on 2 CPU cores with JAX 0.10, 2-3% with 0.12
                   # (results/lm.md). On more devices: data ways x 2 must divide 12.
                   grad_accum_steps=2, grad_accum_unroll=True)
  elif variant == "llama_tiny":
    c.data.update(tokenizer="bpe", vocab_size=2048)
    c.model.update(n_layer=4, n_head=4, n_kv_head=2, d_model=128, block_size=64, dropout=0.0,
                   positions="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=384, bias=False,
                   tie_embeddings=False, logits_soft_cap=30.0)
    c.train.update(steps=600, batch_size=16, learning_rate=1e-3, min_learning_rate=1e-4,
                   warmup_steps=60, lr_decay_steps=600, eval_every=200, eval_batches=50,
                   checkpoint_every=200, log_every=50)
  elif variant in ("moe_tiny", "moe_tiny_dense"):
    # llama_tiny's model; moe_tiny: every MLP an MoE of 8 SwiGLU experts of hidden 192, top 2,
    # so a token uses as many MLP parameters as the dense twin's hidden 384 (moe_tiny_dense).
    c.data.update(tokenizer="bpe", vocab_size=2048)
    c.model.update(n_layer=4, n_head=4, n_kv_head=2, d_model=128, block_size=64, dropout=0.0,
                   positions="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=384, bias=False,
                   tie_embeddings=False, logits_soft_cap=30.0)
    if variant == "moe_tiny":
      c.model.moe.update(num_experts=8, top_k=2, hidden=192)
    c.train.update(steps=MOE_TINY_STEPS, batch_size=16, learning_rate=1e-3,
                   min_learning_rate=1e-4, warmup_steps=40, lr_decay_steps=MOE_TINY_STEPS,
                   eval_every=100, eval_batches=50, checkpoint_every=100, log_every=25)
  elif variant == "smoke":  # seconds: for tests and a first look
    c.model.update(n_layer=2, n_head=2, d_model=32, block_size=32)
    c.train.update(steps=20, batch_size=4, warmup_steps=2, eval_every=10, eval_batches=2,
                   checkpoint_every=10, log_every=5)
    c.sample.max_new_tokens = 40
  else:
    raise ValueError(f"unknown variant {variant!r} of lm.py: use '', 'nanogpt_baby', "
                     f"'llama_tiny', 'moe_tiny', 'moe_tiny_dense' or 'smoke'")
  return c
