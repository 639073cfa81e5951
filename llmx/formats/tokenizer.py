"""A pretrained checkpoint's tokenizer: HF `tokenizers` built from `tokenizer.json` (a Hugging
Face folder) or from a GGUF file's vocabulary, merges and pre-tokenizer name, with the
checkpoint's special tokens and chat template."""
import json
import pathlib

import numpy as np

from llmx.errors import LlmxError
from llmx.formats import chat_template

# GGUF `tokenizer.ggml.pre` -> the split before byte-level BPE (llama.cpp's names). Regexes are
# those of the original tokenizer.json files.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2")
# GGUF token types: 3 = control, 4 = user-defined; both are matched whole in text.
_SPECIAL_TOKEN_TYPES = (3, 4)


class TokenizerError(LlmxError, ValueError):
  pass


class PretrainedTokenizer:
  """encode/decode, the end-of-turn ids and the chat template of a pretrained checkpoint.

  tokenizer: a `tokenizers.Tokenizer`. eos_token_ids: every id that ends a turn (generation stops
  at any of them). add_bos: whether `encode(..., add_special_tokens=True)` puts bos_token first.
  """

  def __init__(self, tokenizer, *, chat_template: str = "", bos_token: str | None = None,
               eos_token: str | None = None, eos_token_ids=(), add_bos: bool = False,
               pad_token: str | None = None):
    self.tokenizer = tokenizer
    self.chat_template = chat_template or ""
    self.bos_token, self.eos_token, self.add_bos = bos_token, eos_token, add_bos
    ids = [i for i in eos_token_ids if i is not None]
    if eos_token is not None and self.token_to_id(eos_token) is not None:
      ids.insert(0, self.token_to_id(eos_token))
    self.eos_token_ids = tuple(dict.fromkeys(ids))
    pad = self.token_to_id(pad_token) if pad_token else None
    self.pad_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  def encode(self, text: str, *, add_special_tokens: bool = False) -> np.ndarray:
    """-> int32 [n]. Special tokens written in the text (e.g. `<|im_end|>`) become their ids;
    add_special_tokens puts the BOS first where the checkpoint asks for one."""
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    if add_special_tokens and self.add_bos and self.bos_token is not None:
      ids = [self.token_to_id(self.bos_token)] + ids
    return np.asarray(ids, np.int32)

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages, *, add_generation_prompt: bool = True,
                          tokenize: bool = False):
    """The conversation rendered by the checkpoint's template (text, or its ids)."""
    text = chat_template.render(self.chat_template, messages,
                                add_generation_prompt=add_generation_prompt,
                                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
    return self.encode(text) if tokenize else text

  # ------------------------------------------------------------------------ Hugging Face folders

  def save(self, folder: str | pathlib.Path) -> pathlib.Path:
    """tokenizer.json and tokenizer_config.json (with the chat template), as transformers reads
    them."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    self.tokenizer.save(str(folder / "tokenizer.json"))
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=self.bos_token,
                  eos_token=self.eos_token, add_bos_token=self.add_bos,
                  pad_token=self.tokenizer.id_to_token(self.pad_id),
                  chat_template=self.chat_template or None, clean_up_tokenization_spaces=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder

  @classmethod
  def from_folder(cls, folder: str | pathlib.Path, *, eos_token_ids=()) -> "PretrainedTokenizer":
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) of a Hugging Face folder."""
    from tokenizers import Tokenizer
    folder = pathlib.Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
      raise TokenizerError(f"{folder}: no tokenizer.json (llmx reads fast tokenizers only)")
    try:
      tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
      raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from e
    config = _read_json(folder / "tokenizer_config.json")
    template = config.get("chat_template") or ""
    if isinstance(template, list):  # named templates: the default one
      template = next((t["template"] for t in template if t.get("name") == "default"), "")
    if (folder / "chat_template.jinja").is_file():
      template = (folder / "chat_template.jinja").read_text()
    return cls(tokenizer, chat_template=template, bos_token=_token(config.get("bos_token")),
               eos_token=_token(config.get("eos_token")), eos_token_ids=eos_token_ids,
               add_bos=bool(config.get("add_bos_token", False)),
               pad_token=_token(config.get("pad_token")))

  # ------------------------------------------------------------------------------------ GGUF

  @classmethod
  def from_gguf(cls, gguf_file) -> "PretrainedTokenizer":
    """The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`): byte-level BPE."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    path = gguf_file.path
    model = gguf_file.get("tokenizer.ggml.model")
    if model != "gpt2":
      raise TokenizerError(f"{path}: tokenizer.ggml.model={model!r} is not supported; supported: "
                           f"'gpt2' (byte-level BPE: Llama 3, Qwen2, SmolLM, GPT-2)")
    tokens = list(gguf_file.require("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in gguf_file.require("tokenizer.ggml.merges")]
    types = list(gguf_file.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                     ignore_merges=gguf_file.get("tokenizer.ggml.pre") in
                                     ("llama-bpe", "llama3")))
    tokenizer.pre_tokenizer = _gguf_pre_tokenizer(gguf_file.get("tokenizer.ggml.pre") or "default",
                                                  path)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind in _SPECIAL_TOKEN_TYPES])
    name = lambda key: tokens[gguf_file.get(key)] if gguf_file.get(key) is not None else None
    eot = [gguf_file.get(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    return cls(tokenizer, chat_template=gguf_file.get("tokenizer.chat_template") or "",
               bos_token=name("tokenizer.ggml.bos_token_id"),
               eos_token=name("tokenizer.ggml.eos_token_id"), eos_token_ids=eot,
               add_bos=bool(gguf_file.get("tokenizer.ggml.add_bos_token", False)),
               pad_token=name("tokenizer.ggml.padding_token_id"))


def _gguf_pre_tokenizer(name: str, path):
  from tokenizers import Regex, pre_tokenizers as pre
  byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=True)
  if name in ("default", "gpt2"):
    return byte_level
  if name == "smollm":  # every digit alone, then GPT-2's split (SmolLM's tokenizer.json)
    return pre.Sequence([pre.Digits(individual_digits=True), byte_level])
  split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(name)
  if split is None:
    raise TokenizerError(f"{path}: tokenizer.ggml.pre={name!r} is not supported; supported: "
                         f"{', '.join(GGUF_PRE_TOKENIZERS)}")
  return pre.Sequence([pre.Split(Regex(split), behavior="isolated"),
                       pre.ByteLevel(add_prefix_space=False, use_regex=False)])


def _token(value) -> str | None:
  """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
  return value.get("content") if isinstance(value, dict) else value


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise TokenizerError(f"{path}: not valid JSON ({e})") from e
