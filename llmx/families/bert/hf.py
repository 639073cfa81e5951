"""Hugging Face BERT folders <-> llmx BERT: config.json and safetensors only (no torch, no pickle).

Hugging Face stores linear weights as (out, in) and separate query/key/value projections; llmx
keeps kernels as (in, out) and one fused QKV projection, so loading transposes and concatenates.
Checkpoints saved from `BertForPreTraining` prefix the encoder with `bert.` and hold the heads
under `cls.`; both layouts load.
"""
import dataclasses
import json
import logging
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmx.errors import LlmxError
from llmx.families.bert.model import BertConfig, BertForPreTraining, BertModel

log = logging.getLogger("llmx")

SUPPORTED_ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


class CheckpointFormatError(LlmxError, ValueError):
  """The folder is not a BERT checkpoint llmx can read; the message says what is wrong."""


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


def _linear(prefix: str, linear: nnx.Linear) -> dict:
  return {f"{prefix}.weight": (linear.kernel, "T"), f"{prefix}.bias": (linear.bias, None)}


def _norm(prefix: str, norm) -> dict:
  return {f"{prefix}.weight": (norm.scale, None), f"{prefix}.bias": (norm.offset, None)}


def _encoder_names(model: BertModel) -> dict:
  """Hugging Face name -> (llmx Param, transform); the fused QKV is handled separately."""
  e = model.embeddings
  names = {"embeddings.word_embeddings.weight": (e.word.embedding, None),
           "embeddings.position_embeddings.weight": (e.position, None),
           "embeddings.token_type_embeddings.weight": (e.token_type, None),
           **_norm("embeddings.LayerNorm", e.norm), **_linear("pooler.dense", model.pooler)}
  for i, layer in enumerate(model.layers):
    p = f"encoder.layer.{i}."
    names.update({**_linear(p + "attention.output.dense", layer.attn.out),
                  **_norm(p + "attention.output.LayerNorm", layer.attn_norm),
                  **_linear(p + "intermediate.dense", layer.fc_in),
                  **_linear(p + "output.dense", layer.fc_out),
                  **_norm(p + "output.LayerNorm", layer.mlp_norm)})
  return names


def _qkv_names(i: int) -> list[str]:
  p = f"encoder.layer.{i}.attention.self."
  return [p + f"{n}.{w}" for w in ("weight", "bias") for n in ("query", "key", "value")]


def _head_names(model: BertForPreTraining) -> dict:
  return {**_linear("cls.predictions.transform.dense", model.mlm_dense),
          **_norm("cls.predictions.transform.LayerNorm", model.mlm_norm),
          "cls.predictions.bias": (model.mlm_bias, None),
          **_linear("cls.seq_relationship", model.nsp)}


# Buffers and tied copies that carry no parameter of their own.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "cls.predictions.decoder.weight",
                     "cls.predictions.decoder.bias")


def _read_safetensors(folder: pathlib.Path) -> dict:
  from safetensors import safe_open
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (folder / "model.safetensors").is_file():
    files = ["model.safetensors"]
  else:
    present = sorted(p.name for p in folder.iterdir())
    pickled = [n for n in present if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".h5"))]
    hint = (f"; {', '.join(pickled)} are pickle/TF formats, which llmx does not read: convert "
            f"them to safetensors") if pickled else ""
    raise CheckpointFormatError(f"{folder}: no model.safetensors (files: {', '.join(present)}){hint}")
  weights = {}
  for name in files:
    # framework="flax" reads bfloat16 too (numpy has no bfloat16); everything becomes float32.
    with safe_open(str(folder / name), framework="flax") as f:
      for key in f.keys():
        weights[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
  return weights


def _rename_legacy(name: str) -> str:
  # Checkpoints converted from the original TensorFlow BERT name LayerNorm parameters gamma/beta.
  return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def _assign(model_names: dict, qkv_layers, weights: dict, folder) -> None:
  """Copies `weights` into the Params; raises one error listing every missing, unexpected and
  mis-shaped weight."""
  missing, misshaped = [], []
  for name, (param, transform) in model_names.items():
    if name not in weights:
      missing.append(name)
      continue
    value = weights[name].T if transform == "T" else weights[name]
    if value.shape != param.shape:
      want = param.shape[::-1] if transform == "T" else param.shape
      misshaped.append(f"{name}: {weights[name].shape}, expected {tuple(want)}")
      continue
    param[...] = jnp.asarray(value, param.dtype)
  for i, attn in qkv_layers:
    names = _qkv_names(i)
    absent = [n for n in names if n not in weights]
    missing += absent
    if absent:
      continue
    d = attn.qkv.kernel.shape[0]
    n_out = attn.n_head * attn.head_dim
    bad = [f"{n}: {weights[n].shape}, expected {(n_out, d) if n.endswith('weight') else (n_out,)}"
           for n in names if weights[n].shape != ((n_out, d) if n.endswith("weight") else (n_out,))]
    if bad:
      misshaped += bad
      continue
    attn.qkv.kernel[...] = jnp.asarray(np.concatenate([weights[n].T for n in names[:3]], 1))
    attn.qkv.bias[...] = jnp.asarray(np.concatenate([weights[n] for n in names[3:]], 0))
  if missing or misshaped:
    parts = []
    if missing:
      parts.append(f"missing weights ({len(missing)}): {', '.join(missing)}")
    if misshaped:
      parts.append(f"mis-shaped weights ({len(misshaped)}): {'; '.join(misshaped)}")
    raise CheckpointFormatError(f"{folder} does not match its config.json: {'. '.join(parts)}")


def from_pretrained(path, *, with_pretraining_heads: bool = False, attention_impl=None,
                    dropout: float | None = None, seed: int = 0):
  """Loads a Hugging Face BERT folder.

  dropout: overrides the config's hidden_dropout_prob.
  -> BertModel, or BertForPreTraining (with_pretraining_heads=True; the folder must then hold
  `cls.*` weights). The tokenizer of the same folder:
  `llmx.data.wordpiece.WordPieceTokenizer.from_folder(path)`.
  Raises CheckpointFormatError naming what is wrong: no such folder, no or a non-BERT
  config.json, no safetensors, missing / unexpected / mis-shaped weights.
  """
  folder = pathlib.Path(path).expanduser()
  if not folder.is_dir():
    raise CheckpointFormatError(f"{path}: no such folder (expected a Hugging Face BERT folder "
                                f"with config.json and model.safetensors)")
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise CheckpointFormatError(f"{folder} is not a Hugging Face checkpoint: no config.json")
  try:
    hf_config = json.loads(config_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointFormatError(f"{config_file}: not valid JSON ({e})") from None
  config = config_from_hf(hf_config, source=str(config_file), attention_impl=attention_impl)
  if dropout is not None:  # fine-tuning may want another rate than the checkpoint's config
    config = dataclasses.replace(config, dropout=dropout)
  weights = _read_safetensors(folder)
  weights = {_rename_legacy(k): v for k, v in weights.items()}
  # BertForPreTraining / BertForMaskedLM files prefix the encoder with "bert.".
  if any(k.startswith("bert.") for k in weights):
    weights = {k.removeprefix("bert."): v for k, v in weights.items()}

  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  bert = BertModel(config, rngs=rngs)
  names = _encoder_names(bert)
  model = bert
  if with_pretraining_heads:
    model = BertForPreTraining(bert, rngs=rngs)
    names.update(_head_names(model))
  qkv = [(i, layer.attn) for i, layer in enumerate(bert.layers)]
  expected = set(names) | {n for i, _ in qkv for n in _qkv_names(i)}
  unexpected = sorted(k for k in weights if k not in expected and not k.endswith(_IGNORED_SUFFIXES)
                      and not (k.startswith("cls.") and not with_pretraining_heads))
  if unexpected:
    raise CheckpointFormatError(
        f"{folder}: unexpected weights ({len(unexpected)}) that a BERT encoder with this "
        f"config.json does not have: {', '.join(unexpected)}")
  skipped = sorted(k for k in weights if k.startswith("cls.") and k not in expected)
  if skipped:
    log.info("from_pretrained: %d head weights not loaded (%s...)", len(skipped), skipped[0])
  _assign(names, qkv, weights, folder)
  return model


def _state_dict(model) -> dict:
  bert = model.bert if isinstance(model, BertForPreTraining) else model
  names = _encoder_names(bert)
  if isinstance(model, BertForPreTraining):
    names.update(_head_names(model))
  out = {name: np.asarray(p[...]).T if t == "T" else np.asarray(p[...])
         for name, (p, t) in names.items()}
  for i, layer in enumerate(bert.layers):
    kernel, bias = np.asarray(layer.attn.qkv.kernel[...]), np.asarray(layer.attn.qkv.bias[...])
    wq, wk, wv = np.split(kernel, 3, axis=1)
    bq, bk, bv = np.split(bias, 3)
    for name, value in zip(_qkv_names(i), (wq.T, wk.T, wv.T, bq, bk, bv)):
      out[name] = value
  if isinstance(model, BertForPreTraining):
    out = {(k if k.startswith("cls.") else "bert." + k): v for k, v in out.items()}
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def save_pretrained(model, path) -> pathlib.Path:
  """Writes a BertModel or BertForPreTraining as a Hugging Face folder (config.json,
  model.safetensors) that `from_pretrained` and Hugging Face's BertModel read. The tokenizer is
  saved separately (WordPieceTokenizer.save)."""
  from safetensors.numpy import save_file
  folder = pathlib.Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  bert = model.bert if isinstance(model, BertForPreTraining) else model
  hf = config_to_hf(bert.config)
  if isinstance(model, BertForPreTraining):
    hf["architectures"] = ["BertForPreTraining"]
  (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  save_file(_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
  return folder
