"""Fine-tuning evaluation: dev metrics of each task (accuracy, tag accuracy, SQuAD exact match
and F1) on every dev example."""
import collections
import re
import string

import jax
import numpy as np
from flax import nnx

from llmx.data import tsv


class DevEvaluator:
  """Dev metrics on every dev example (exact counts, no batch averaging): the `on_eval` hook."""

  def __init__(self, task: str, examples: list, rows: list, *, batch_size: int, pad_id: int,
               max_length: int, pad_multiple: int):
    self.task, self.examples, self.rows = task, examples, rows
    self.batches = tsv.eval_batches(examples, batch_size=batch_size, pad_id=pad_id,
                                    max_length=max_length, pad_multiple=pad_multiple)

    def forward(graphdef, state, batch):
      model = nnx.merge(graphdef, state)
      return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    self._forward = jax.jit(forward, static_argnums=0)

  def __call__(self, model, step) -> dict:
    graphdef, state = nnx.split(model)
    outputs = [jax.tree.map(np.asarray, self._forward(graphdef, state, b)) for b in self.batches]
    if self.task == "classification":
      logits = np.concatenate(outputs)
      gold = np.array([e["labels"] for e in self.examples])
      return dict(val_loss=_cross_entropy(logits, gold),
                  val_accuracy=float((np.argmax(logits, -1) == gold).mean()))
    if self.task == "tagging":
      logits = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outputs])
      gold = np.concatenate([b["labels"].reshape(-1) for b in self.batches])
      labelled = gold != tsv.IGNORE_INDEX
      logits, gold = logits[labelled], gold[labelled]
      return dict(val_loss=_cross_entropy(logits, gold),
                  val_accuracy=float((np.argmax(logits, -1) == gold).mean()))
    starts = [row for o in outputs for row in o[0]]
    ends = [row for o in outputs for row in o[1]]
    em = f1 = loss = 0.0
    for start, end, example, row in zip(starts, ends, self.examples, self.rows):
      prediction = best_span_text(start, end, example["offsets"], row["context"])
      em += normalize_answer(prediction) == normalize_answer(row["answer_text"])
      f1 += token_f1(prediction, row["answer_text"])
      loss += (_cross_entropy(start[None], np.array([example["start_positions"]])) +
               _cross_entropy(end[None], np.array([example["end_positions"]]))) / 2
    n = len(self.rows)
    return dict(val_loss=loss / n, val_exact_match=em / n, val_f1=f1 / n)


def _cross_entropy(logits: np.ndarray, gold: np.ndarray) -> float:
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return float(-logp[np.arange(len(gold)), gold].mean())


def best_span_text(start_logits, end_logits, offsets, context: str, max_answer_tokens: int = 30) -> str:
  """The context text of the span maximising start + end logit with start <= end, both inside
  the context, at most max_answer_tokens long."""
  n = len(offsets)
  start_logits, end_logits = start_logits[:n], end_logits[:n]
  inside = offsets[:, 0] >= 0
  scores = start_logits[:, None] + end_logits[None, :]
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  valid = inside[:, None] & inside[None, :] & (j >= i) & (j - i < max_answer_tokens)
  if not valid.any():
    return ""
  s, e = np.unravel_index(np.argmax(np.where(valid, scores, -np.inf)), scores.shape)
  return context[offsets[s, 0]:offsets[e, 1]]


def normalize_answer(text: str) -> str:
  """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, gold: str) -> float:
  p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
  common = sum((collections.Counter(p) & collections.Counter(g)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(p), common / len(g)
  return 2 * precision * recall / (precision + recall)
