"""Chat templates: a checkpoint's own Jinja template renders a conversation into the text the
model was tuned on, in a sandbox (as transformers does: a template is code from the checkpoint)."""
import functools
import json
from datetime import datetime

from llmx.errors import LlmxError

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(LlmxError, ValueError):
  pass


def check_messages(messages, where: str = "messages") -> list[dict]:
  """-> [{"role", "content"}]: each message must have a known `role` and a string `content`; an
  error starts with `where` (e.g. "chat.jsonl:12")."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ChatTemplateError(f"{where}: must be a non-empty list of {{'role': ..., 'content': ...}}, "
                            f"got {_short(messages)}")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ChatTemplateError(f"{where}: messages[{i}] must be an object with 'role' and "
                              f"'content', got {_short(m)}")
    if m["role"] not in ROLES:
      raise ChatTemplateError(f"{where}: messages[{i}] has unknown role {_short(m['role'])}; "
                              f"roles: {', '.join(ROLES)}")
    if not isinstance(m["content"], str):
      raise ChatTemplateError(f"{where}: messages[{i}].content must be a string, got "
                              f"{type(m['content']).__name__}")
  return [{"role": m["role"], "content": m["content"]} for m in messages]


def _short(x, limit: int = 60) -> str:
  text = repr(x)
  return text if len(text) <= limit else text[:limit] + "..."


@functools.lru_cache(maxsize=16)
def _compile(template: str):
  from jinja2 import TemplateError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  # transformers' settings: blocks trimmed, `tojson` without HTML escaping, two helpers.
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except TemplateError as e:
    raise ChatTemplateError(f"the chat template does not parse: {e}") from e


def render(template: str, messages, *, add_generation_prompt: bool = True, **variables) -> str:
  """The conversation as the template writes it; `variables` (e.g. bos_token, eos_token) are
  visible to the template."""
  from jinja2 import TemplateError
  if not template:
    raise ChatTemplateError("this tokenizer has no chat template")
  try:
    return _compile(template).render(messages=check_messages(messages),
                                     add_generation_prompt=add_generation_prompt, **variables)
  except TemplateError as e:
    raise ChatTemplateError(f"the chat template failed: {e}") from e
