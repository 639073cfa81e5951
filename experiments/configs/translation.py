"""English -> French translation with the encoder-decoder Transformer (llmx/families/seq2seq/model.py)
on Tatoeba pairs ($LLMX_DATA_DIR/eng-fra.txt).

Launch:
  python -m experiments.train_translation --config=experiments/configs/translation.py \
      --workdir=/tmp/enfr
  python -m experiments.translate --workdir=/tmp/enfr "Where is the station?"

The file's pairs are split with a fixed seed: 2,000 test, 2,000 validation, the rest (131,842)
train. A BPE vocabulary of 8,000 subwords shared by both languages is learned on the training
split. Training pairs with a side longer than data.max_train_len tokens are left out (15 of
131,842 at 48); sources longer than model.max_len at test time are truncated (and counted).
Batches hold about train.tokens_per_batch tokens of sentences of similar lengths.

Variants:
  (default)  d_model 256, 4 heads, 3 encoder + 3 decoder layers, ReLU MLP 1024, pre-LN,
             sinusoidal positions, shared embeddings tied to the output, no dropout (7.58M
             parameters); label smoothing 0.1; AdamW (0.9, 0.98), peak lr 1.5e-3 after 200
             warm-up steps, cosine decay to step 1,400; batches of ~4,096 tokens (369 per
             epoch: 1,400 steps are ~3.8 epochs); float32. Every train.eval_every steps:
             validation loss and greedy BLEU on data.bleu_val_pairs validation pairs; at the
             end, test BLEU with beam search (4 beams, length penalty 0.6).
             Hardware: 2 CPU cores; measured 68.9 CPU-minutes for the whole command (~35
             minutes on 2 idle cores). Expected: test BLEU 38.05 (sacreBLEU, beam 4; one
             seed), validation greedy BLEU ~36; see results/translation.md.
  smoke      a tiny model on the first 3,000 pairs, 20 steps: seconds, for tests.
"""
import os

import ml_collections


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      path=os.path.join(os.environ.get("LLMX_DATA_DIR", "data"), "eng-fra.txt"),
      max_pairs=0,            # > 0: only the first max_pairs lines (quick runs)
      num_test=2000, num_val=2000, split_seed=0,
      vocab_size=8000,        # BPE subwords shared by source and target
      max_train_len=48,       # training pairs with a longer side (in tokens, </s> included) are left out
      bleu_val_pairs=300,     # validation pairs translated (greedy) for BLEU at each evaluation
  ))
  c.model = ml_collections.ConfigDict(dict(
      d_model=256, n_head=4, n_encoder_layers=3, n_decoder_layers=3, mlp_hidden=1024,
      dropout=0.0,            # ~4 epochs: dropout would slow learning more than it saves
      norm="pre", positions="sinusoidal", share_embeddings=True, tie_output=True,
      max_len=128,            # positions; longer test sources are truncated, longer CLI input refused
      attention_impl="",
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=1400, tokens_per_batch=4096, learning_rate=1.5e-3, min_learning_rate=1e-5,
      schedule="cosine",      # warm-up then "cosine" decay to min_learning_rate, or "rsqrt"
      warmup_steps=200, beta1=0.9, beta2=0.98, weight_decay=0.0, grad_clip=1.0,
      label_smoothing=0.1,
      eval_every=200, eval_batches=8, checkpoint_every=100, log_every=25, max_checkpoints=3,
      seed=0,
  ))
  c.eval = ml_collections.ConfigDict(dict(
      beam_size=4, length_penalty=0.6, decode_batch=250,
      test=True,              # test BLEU with beam search after the last step
  ))
  # Resuming with another batch size is refused unless this is True (a deliberate change).
  c.train.allow_batch_size_change = False
  # The learning-rate schedule's length; 0: train.steps. Resuming with a larger train.steps keeps
  # the saved length only when this says so (the run is refused otherwise).
  c.train.lr_decay_steps = 0
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  if variant in (None, ""):
    pass
  elif variant == "smoke":
    c.data.update(max_pairs=3000, num_test=100, num_val=100, vocab_size=300, max_train_len=24,
                  bleu_val_pairs=40)
    c.model.update(d_model=32, n_head=2, n_encoder_layers=1, n_decoder_layers=1, mlp_hidden=64,
                   max_len=32)
    c.train.update(steps=20, tokens_per_batch=512, warmup_steps=5, eval_every=10, eval_batches=2,
                   checkpoint_every=10, log_every=5)
    c.eval.update(beam_size=2, decode_batch=50)
  else:
    raise ValueError(f"unknown variant {variant!r} of translation.py: use '' or 'smoke'")
  return c
