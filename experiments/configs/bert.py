"""BERT pretraining from scratch: masked language modelling + next sentence prediction.

Launch:
  python -m experiments.pretrain_bert --config=experiments/configs/bert.py --workdir=/tmp/bert
  python -m experiments.pretrain_bert --config=experiments/configs/bert.py \
      --config.data.path=$LLMX_DATA_DIR/tinyshakespeare.txt --workdir=/tmp/bert_shakespeare
  # then fine-tune it: --config.init_from=/tmp/bert_shakespeare (see configs/finetune.py)

A WordPiece vocabulary (data.vocab_size) is trained with Hugging Face `tokenizers` on the
training split's lines, or loaded from a Hugging Face folder (data.tokenizer). Sentences are the
corpus's non-empty lines; pairs are [CLS] A [SEP] B [SEP] of data.max_len tokens with B the true
continuation or (p = 1/2) a random place in the corpus; 15% of tokens are selected for MLM with
the 80/10/10 rule. Evaluation reports val_mlm_accuracy (and the unigram baseline it must beat:
always predicting the most frequent token) and val_nsp_accuracy (chance: 0.5). The run also
writes DIR/hf/, a Hugging Face folder (config.json, model.safetensors, tokenizer.json).

Variants:
  (default)  4 layers x 128 wide (4 heads, MLP 512), pairs of 64 tokens, batch 64, 1,500 steps.
             Hardware: 2 CPU cores, about 10 minutes (uncontended). Expected on Tiny
             Shakespeare: see results/bert.md (MLM accuracy far above the unigram baseline,
             NSP accuracy above 0.5).
  smoke      2 layers x 32, seconds: for tests and a first look.
"""
import ml_collections


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      path="",              # a UTF-8 text file, one sentence (or line of verse) per line; empty: embedded corpus
      val_fraction=0.1,     # the last lines validate
      tokenizer="",         # a Hugging Face folder with tokenizer.json or vocab.txt; empty: train one
      vocab_size=4096,      # WordPiece vocabulary trained on the training split
      lowercase=True,
      max_len=64,           # tokens per pair, [CLS] and two [SEP] included
      mask_prob=0.15,
  ))
  c.model = ml_collections.ConfigDict(dict(
      num_layers=4, num_heads=4, hidden_size=128, intermediate_size=512,
      max_position_embeddings=128, dropout=0.0,
      attention_impl="",    # "": the kernel's default for the backend
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=64, learning_rate=1e-3, min_learning_rate=1e-5,
      warmup_steps=150, beta1=0.9, beta2=0.99, weight_decay=0.01, grad_clip=1.0,
      eval_every=250, eval_batches=20, checkpoint_every=500, log_every=50,
      max_checkpoints=3, seed=0,
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
    c.data.update(vocab_size=300, max_len=32)
    c.model.update(num_layers=2, num_heads=2, hidden_size=32, intermediate_size=64,
                   max_position_embeddings=32)
    c.train.update(steps=20, batch_size=8, warmup_steps=2, eval_every=10, eval_batches=2,
                   checkpoint_every=10, log_every=5)
  else:
    raise ValueError(f"unknown variant {variant!r} of bert.py: use '' or 'smoke'")
  return c
