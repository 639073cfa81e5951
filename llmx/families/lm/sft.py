"""Supervised fine-tuning of a pretrained decoder LM on chat data, in full or with LoRA: the
recipe `FINETUNE` (experiments/finetune_lm.py, experiments/configs/sft.py).

The loss is the next-token cross-entropy on assistant tokens only (llmx.data.chat), over rows
packed with several conversations (segment ids keep them apart) or padded one per row. With
`train.lora.rank` > 0 only the adapters are trained, optimised and checkpointed; the base weights
stay frozen (in `model.dtype`) and are read again from `model.checkpoint` on resume. The held-out
assistant-token loss is evaluated before the first step (step 0) and at every evaluation; at the
end the adapters are merged into a Hugging Face folder (WORKDIR/export) and a few held-out
replies are written to WORKDIR/samples.json.
"""
import json
import logging
import pathlib

import jax
import ml_collections
from flax import nnx

from llmx import inference, pretrained
from llmx.data import chat
from llmx.families.lm import lora as lm_lora
from llmx.nn.params import num_params
from llmx.train import optimizers
from llmx.train.config_check import ConfigError, require_choice, require_positive, require_range
from llmx.train.recipe import Experiment, Recipe
from llmx.train.step import supervised

log = logging.getLogger("llmx")
SOURCES = ("jsonl", "chitchat")


def validate(c: ml_collections.ConfigDict):
  require_positive(c, "train.steps", "train.batch_size", "train.log_every", "data.seq_len",
                   "eval.batch_size")
  require_positive(c, "train.eval_every", "train.checkpoint_every", "train.seed",
                   "train.lora.rank", "data.held_out", "data.max_turns", "eval.samples",
                   "eval.max_new_tokens", allow_zero=True)
  require_choice(c, "data.source", SOURCES)
  require_choice(c, "model.dtype", pretrained.DTYPES)
  if c.data.source == "jsonl" and not c.data.path:
    raise ConfigError("data.path='': give a chat JSON Lines file, or data.source='chitchat'")
  if c.data.max_turns % 2:
    raise ConfigError(f"data.max_turns={c.data.max_turns}: must be even (user, assistant pairs)")
  if c.train.lora.rank:
    require_range(c, "train.lora.alpha", 0.0, float("inf"), low_open=True)
    require_range(c, "train.lora.dropout", 0.0, 1.0)
    unknown = [t for t in c.train.lora.targets.split(",") if t not in lm_lora.TARGETS]
    if unknown:
      raise ConfigError(f"train.lora.targets={c.train.lora.targets!r}: {', '.join(unknown)} names "
                        f"no layer; targets: {', '.join(lm_lora.TARGETS)}")
  optimizers.validate(c.train)


def conversations(c: ml_collections.ConfigDict) -> tuple[list, list]:
  """-> (train, held-out) conversations: a fixed seeded split of the data."""
  if c.data.source == "chitchat":
    convs = chat.chitchat_conversations(c.data.path or None, max_turns=c.data.max_turns or None)
  else:
    convs = chat.read_chat_jsonl(c.data.path)
  if c.data.held_out >= len(convs):
    raise ConfigError(f"data.held_out={c.data.held_out}: the data has only {len(convs)} conversations")
  return chat.split_held_out(convs, c.data.held_out, seed=c.data.split_seed)


def _loss(model, batch):
  """batch: chat.rows_to_batch's dict of int32 [rows, seq_len]."""
  return model.loss(batch["inputs"], batch["targets"], positions=batch["positions"],
                    segment_ids=batch["segment_ids"])


def experiment(c: ml_collections.ConfigDict, mesh, workdir: str) -> Experiment:
  source = pretrained.resolve(c.model.checkpoint)
  model, tokenizer = pretrained.load(source, dtype=c.model.dtype)
  train_convs, held_convs = conversations(c)
  rows = dict(seq_len=c.data.seq_len, pack=c.data.pack, pad_id=tokenizer.pad_id)
  train_rows = chat.chat_rows(chat.tokenize_conversations(tokenizer, train_convs), seed=c.train.seed,
                              **rows)
  held_rows = chat.chat_rows(chat.tokenize_conversations(tokenizer, held_convs), seed=None, **rows)
  total = num_params(model)
  lora = c.train.lora
  if lora.rank:
    trained = lm_lora.add_adapters(model, lora.targets.split(","), rank=lora.rank,
                                   alpha=lora.alpha, dropout=lora.dropout, seed=c.train.seed)
  else:
    trained = total
  log.info("%s: %.1fM parameters, training %s (%.3f%%); %d train conversations in %d rows "
           "(%d truncated, %d dropped), %d held out in %d rows", source, total / 1e6,
           f"LoRA rank {lora.rank} on {lora.targets}" if lora.rank else "all", 100 * trained / total,
           len(train_convs), len(train_rows.rows), train_rows.truncated, train_rows.dropped,
           len(held_convs), len(held_rows.rows))
  tx, schedule = optimizers.from_config(c.train)
  trainable = supervised(model, tx, _loss, wrt=nnx.LoRAParam if lora.rank else nnx.Param)
  stat = source.stat()
  meta = dict(
      must_match=dict(checkpoint=str(source), checkpoint_bytes=stat.st_size,
                      lora=lora.to_dict(), data=c.data.to_dict(), batch_size=c.train.batch_size,
                      seed=c.train.seed, dtype=c.model.dtype),
      config=c.to_dict(), trained_params=trained, total_params=total)
  return Experiment(
      trainable=trainable, schedule=schedule,
      train_batches=chat.chat_batches(train_rows, batch_size=c.train.batch_size, seed=c.train.seed,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count()),
      eval_batches=chat.eval_chat_batches(held_rows, batch_size=c.eval.batch_size,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count()),
      meta=meta, tokens_per_step=c.train.batch_size * c.data.seq_len,
      finish=lambda result: _finish(c, result, tokenizer, held_convs, workdir, trained, total))


def _finish(c, result, tokenizer, held_convs, workdir: str, trained: int, total: int) -> dict:
  """Held-out loss before and after, sample replies, and the merged export."""
  if jax.process_index() != 0 or result.preempted:
    return {}
  losses = {h["step"]: h["val_loss"] for h in result.history if "val_loss" in h}
  report = dict(step=result.step, trained_params=trained, total_params=total,
                trained_fraction=trained / total, val_loss_before=losses.get(0),
                val_loss_after=losses.get(result.step))
  samples = []
  for conv in held_convs[:c.eval.samples]:
    prompt_messages = conv[:next(i for i, m in enumerate(conv) if m["role"] == "assistant")]
    prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=True)
    out = inference.decode(result.model, [prompt], max_new_tokens=c.eval.max_new_tokens,
                           stop_tokens=tokenizer.eos_token_ids, pad_to=64)
    samples.append(dict(prompt=prompt_messages[-1]["content"],
                        reply=tokenizer.decode(out.continuations[0]),
                        reference=conv[len(prompt_messages)]["content"]))
  folder = pathlib.Path(workdir)
  (folder / "samples.json").write_text(json.dumps(dict(report, samples=samples), indent=2) + "\n")
  export = pretrained.save(result.model, tokenizer, folder / "export")
  print(f"--- step {result.step}: held-out assistant-token loss {report['val_loss_before']} before, "
        f"{report['val_loss_after']} after; trained {trained:,} of {total:,} parameters "
        f"({100 * trained / total:.3f}%); export: {export} ---", flush=True)
  for s in samples:
    print(f"  user: {s['prompt']!r}\n  model: {s['reply']!r}", flush=True)
  return report


FINETUNE = Recipe("sft", validate, experiment)
