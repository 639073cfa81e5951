"""Hugging Face BERT folders <-> llmx BERT: config.json and safetensors only (no torch, no pickle).

Hugging Face stores linear weights as (out, in) and separate query/key/value projections; llmx
keeps kernels as (in, out) and one fused QKV projection, so loading transposes and concatenates.
Checkpoints saved from `BertForPreTraining` prefix the encoder with `bert.` and hold the heads
under `cls.`; both layouts load.
"""
import dataclasses
import logging
import pathlib

import numpy as np
from flax import nnx

from llmx.families.bert.model import BertConfig, BertForPreTraining, BertModel
from llmx.formats import CheckpointFormatError, hf
from llmx.formats.name_map import TRANSPOSE, Entry, build_and_load, concat, export

log = logging.getLogger("llmx")

SUPPORTED_ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


def config_from_hf(d: dict, *, source: str = "config.json", attention_impl=None) -> BertConfig:
  if d.get("model_type") != "bert":
    raise CheckpointFormatError(
        f"{source}: model_type={d.get('model_type')!r}, not 'bert' (architectures="
        f"{d.get('architectures')}); from_pretrained reads BERT checkpoints only")
  act = d.get("hidden_act", "gelu")
  if act not in SUPPORTED_ACTIVATIONS:
    raise CheckpointFormatError(f"{source}: hidden_act={act!r} is not supported; "
                                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
  if d.get("position_embedding_type", "absolute") != "absolute":
    raise CheckpointFormatError(f"{source}: position_embedding_type="
                                f"{d['position_embedding_type']!r}; only 'absolute' is supported")
  try:
    return BertConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 512),
        type_vocab_size=d.get("type_vocab_size", 2), dropout=d.get("hidden_dropout_prob", 0.1),
        layer_norm_epsilon=d.get("layer_norm_eps", 1e-12),
        initializer_range=d.get("initializer_range", 0.02),
        gelu_approximate=SUPPORTED_ACTIVATIONS[act], attention_impl=attention_impl)
  except KeyError as e:
    raise CheckpointFormatError(f"{source}: missing field {e.args[0]!r}") from None


def config_to_hf(c: BertConfig) -> dict:
  act = "gelu_new" if c.gelu_approximate else "gelu"
  return dict(model_type="bert", architectures=["BertModel"], vocab_size=c.vocab_size,
              hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
              num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
              max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
              hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=0.0,
              layer_norm_eps=c.layer_norm_epsilon, initializer_range=c.initializer_range,
              hidden_act=act, position_embedding_type="absolute", pad_token_id=0)


def _linear(name: str, path: tuple) -> list[Entry]:
  return [Entry(f"{name}.weight", path + ("kernel",), TRANSPOSE),
          Entry(f"{name}.bias", path + ("bias",))]


def _norm(name: str, path: tuple) -> list[Entry]:
  return [Entry(f"{name}.weight", path + ("scale",)), Entry(f"{name}.bias", path + ("offset",))]


def encoder_entries(c: BertConfig, prefix: tuple = ()) -> list[Entry]:
  """The name map of a BertModel at `prefix` (("bert",) inside a BertForPreTraining)."""
  e = prefix + ("embeddings",)
  table = [Entry("embeddings.word_embeddings.weight", e + ("word", "embedding")),
           Entry("embeddings.position_embeddings.weight", e + ("position",)),
           Entry("embeddings.token_type_embeddings.weight", e + ("token_type",)),
           *_norm("embeddings.LayerNorm", e + ("norm",)),
           *_linear("pooler.dense", prefix + ("pooler",))]
  for i in range(c.num_layers):
    name, ours = f"encoder.layer.{i}.", prefix + ("layers", i)
    # Hugging Face keeps query, key and value apart; SelfAttention fuses them into one qkv.
    self_attn = [f"{name}attention.self.{n}" for n in ("query", "key", "value")]
    table += [Entry([n + ".weight" for n in self_attn], ours + ("attn", "qkv", "kernel"),
                    concat(3, transpose=True)),
              Entry([n + ".bias" for n in self_attn], ours + ("attn", "qkv", "bias"), concat(3)),
              *_linear(name + "attention.output.dense", ours + ("attn", "out")),
              *_norm(name + "attention.output.LayerNorm", ours + ("attn_norm",)),
              *_linear(name + "intermediate.dense", ours + ("fc_in",)),
              *_linear(name + "output.dense", ours + ("fc_out",)),
              *_norm(name + "output.LayerNorm", ours + ("mlp_norm",))]
  return table


def head_entries() -> list[Entry]:
  """The name map of BertForPreTraining's heads (its decoder is tied to the word embeddings)."""
  return [*_linear("cls.predictions.transform.dense", ("mlm_dense",)),
          *_norm("cls.predictions.transform.LayerNorm", ("mlm_norm",)),
          Entry("cls.predictions.bias", ("mlm_bias",)), *_linear("cls.seq_relationship", ("nsp",))]


def entries(model) -> list[Entry]:
  """The name map of a BertModel or BertForPreTraining (names without the "bert." prefix)."""
  if isinstance(model, BertForPreTraining):
    return encoder_entries(model.bert.config, ("bert",)) + head_entries()
  return encoder_entries(model.config)


# Buffers and tied copies that carry no parameter of their own.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "cls.predictions.decoder.weight",
                     "cls.predictions.decoder.bias")


def _rename_legacy(name: str) -> str:
  # Checkpoints converted from the original TensorFlow BERT name LayerNorm parameters gamma/beta.
  return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def from_pretrained(path, *, with_pretraining_heads: bool = False, attention_impl=None,
                    dropout: float | None = None, seed: int = 0):
  """Loads a Hugging Face BERT folder (config.json + model.safetensors or shards), in eval mode.

  dropout: overrides the config's hidden_dropout_prob (training mode turns it on).
  -> BertModel, or BertForPreTraining (with_pretraining_heads=True; the folder must then hold
  `cls.*` weights). The tokenizer of the same folder:
  `llmx.data.wordpiece.WordPieceTokenizer.from_folder(path)`.
  Raises CheckpointFormatError naming what is wrong: no such folder, no or a non-BERT
  config.json, no safetensors, missing / unexpected / mis-shaped weights.
  """
  folder = hf.folder_of(path, "a Hugging Face BERT folder")
  config = config_from_hf(hf.read_config(folder), source=str(folder / hf.CONFIG),
                          attention_impl=attention_impl)
  if dropout is not None:  # fine-tuning may want another rate than the checkpoint's config
    config = dataclasses.replace(config, dropout=dropout)
  infos = {}
  for name, info in hf.read_headers(folder).items():
    # BertForPreTraining / BertForMaskedLM files prefix the encoder with "bert.".
    name = _rename_legacy(name).removeprefix("bert.")
    if not name.endswith(_IGNORED_SUFFIXES):
      infos[name] = info
  if not with_pretraining_heads:
    skipped = sorted(k for k in infos if k.startswith("cls."))
    if skipped:
      log.info("from_pretrained: %d head weights not loaded (%s...)", len(skipped), skipped[0])
    infos = {k: v for k, v in infos.items() if not k.startswith("cls.")}

  def build():
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    model = BertModel(config, rngs=rngs)
    return BertForPreTraining(model, rngs=rngs) if with_pretraining_heads else model

  model = build_and_load(build, entries, infos, source=folder)
  model.eval()
  return model


def state_dict(model) -> dict[str, np.ndarray]:
  """A BertModel or BertForPreTraining as Hugging Face tensors {name: float32 array}."""
  tensors = export(model, entries(model), dtype=np.float32)
  if isinstance(model, BertForPreTraining):
    tensors = {(k if k.startswith("cls.") else "bert." + k): v for k, v in tensors.items()}
  return tensors


def save_pretrained(model, path) -> pathlib.Path:
  """Writes a BertModel or BertForPreTraining as a Hugging Face folder (config.json,
  model.safetensors) that `from_pretrained` and Hugging Face's BertModel read -> the folder. The
  tokenizer is saved separately (WordPieceTokenizer.save)."""
  bert = model.bert if isinstance(model, BertForPreTraining) else model
  config = config_to_hf(bert.config)
  if isinstance(model, BertForPreTraining):
    config["architectures"] = ["BertForPreTraining"]
  return hf.write_checkpoint(path, state_dict(model), config)
