"""LoRA adapters on a decoder LM: which layer and which columns each target name means.

Targets use the Hugging Face / PEFT names: q, k, v (parts of the fused attn.qkv projection), o
(attn.out), gate, up (parts of the fused mlp.gate_up), down (mlp.down); GPT-2-style blocks also
have fc and proj (the GELU MLP).
"""
from flax import nnx

from llmx.errors import LlmxError
from llmx.families.lm.model import GPT
from llmx.nn import lora

TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "fc", "proj")


class LoRAConfigError(LlmxError, ValueError):
  pass


def _layers(model: GPT, block) -> dict:
  """target -> (parent module, attribute, output columns [start, end)) in one block."""
  c = model.config
  hd = c.d_model // c.n_head
  q, kv = c.n_head * hd, (c.n_kv_head or c.n_head) * hd
  attn, mlp = block.attn, block.mlp
  out = dict(q=(attn, "qkv", (0, q)), k=(attn, "qkv", (q, q + kv)),
             v=(attn, "qkv", (q + kv, q + 2 * kv)), o=(attn, "out", (0, c.d_model)))
  if c.mlp == "swiglu":
    h = mlp.hidden
    out.update(gate=(mlp, "gate_up", (0, h)), up=(mlp, "gate_up", (h, 2 * h)),
               down=(mlp, "down", (0, c.d_model)))
  else:
    out.update(fc=(mlp, "fc", (0, c.hidden_size)), proj=(mlp, "proj", (0, c.d_model)))
  return out


def add_adapters(model: GPT, targets, *, rank: int, alpha: float, dropout: float = 0.0,
                 seed: int = 0) -> int:
  """Puts LoRA adapters of `rank` on the `targets` of every block (in place) -> the number of
  adapter parameters. A target that names no layer of this model is an error, before any
  change."""
  targets = tuple(targets)
  available = _layers(model, model.blocks[0])
  unknown = [t for t in targets if t not in available]
  if unknown or not targets:
    raise LoRAConfigError(f"train.lora.targets={','.join(targets)!r}: {', '.join(unknown) or 'empty'} "
                          f"names no layer of this model; its layers: {', '.join(available)}")
  if rank < 1:
    raise LoRAConfigError(f"train.lora.rank={rank}: must be >= 1")
  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  for block in model.blocks:
    layers = _layers(model, block)
    by_layer = {}
    for t in targets:
      parent, name, columns = layers[t]
      by_layer.setdefault((id(parent), name), (parent, name, []))[2].append(columns)
    for parent, name, segments in by_layer.values():
      lora.adapt(parent, name, sorted(segments), rank=rank, alpha=alpha, dropout=dropout, rngs=rngs)
  return lora.num_adapter_params(model)
