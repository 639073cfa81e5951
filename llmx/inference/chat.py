"""A multi-turn chat with a pretrained decoder LM: the checkpoint's chat template, the history,
replies streamed token by token, and the speed of each turn."""
import dataclasses
import time

from llmx.inference.decode import decode
from llmx.inference.prompts import DecodingError

# Prompts are padded to a multiple of this, so the turns of a chat share a few compiled programs.
PAD_TO = 64


@dataclasses.dataclass
class Reply:
  text: str
  prompt_tokens: int
  new_tokens: int
  prefill_s: float      # until the first new token
  decode_s: float       # from the first new token to the last
  compile_s: float      # 0 when the turn reused a compiled program

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

  @property
  def decode_tokens_per_s(self) -> float:
    return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else float("inf")


class ChatSession:
  """The conversation so far, and one method to continue it.

  tokenizer: encode, decode, eos_token_ids and apply_chat_template (llmx.formats.tokenizer).
  options: llmx.inference.decode's (temperature 0 = greedy, top_p, seed, max_new_tokens, ...).
  Generation stops at the model's end-of-turn tokens.
  """

  def __init__(self, model, tokenizer, *, system: str | None = None, **options):
    self.model, self.tokenizer, self.options = model, tokenizer, options
    self.messages = [{"role": "system", "content": system}] if system else []

  def reply(self, message: str, *, on_text=None) -> Reply:
    """Adds the user's message, generates the assistant's reply (streamed to on_text(piece) as it
    is produced), adds it to the history -> Reply. A turn that fails leaves the history as it was."""
    messages = self.messages + [{"role": "user", "content": message}]
    prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    room = self.model.max_decode_len - len(prompt)
    if room < 1:
      raise DecodingError(f"the conversation is {len(prompt)} tokens, the model's context "
                          f"{self.model.max_decode_len}: start a new chat")
    options = dict(self.options)
    stops = set(self.tokenizer.eos_token_ids) | set(options.pop("stop_tokens", ()))
    ids, times, shown = [], [], [""]

    def on_token(tokens, active):
      times.append(time.perf_counter())
      if not active[0] or int(tokens[0]) in stops:
        return
      ids.append(int(tokens[0]))
      text = self.tokenizer.decode(ids)
      if on_text is not None and not text.endswith("\ufffd"):  # wait for a whole character
        on_text(text[len(shown[0]):])
        shown[0] = text

    options["max_new_tokens"] = min(options.get("max_new_tokens") or room, room)
    out = decode(self.model, [prompt], stop_tokens=tuple(stops), on_token=on_token,
                 pad_to=PAD_TO, **options)
    finished = time.perf_counter()
    text = self.tokenizer.decode(ids)
    if on_text is not None and len(text) > len(shown[0]):
      on_text(text[len(shown[0]):])
    self.messages = messages + [{"role": "assistant", "content": text}]
    run_start = finished - out.run_s
    first = times[0] if times else finished
    return Reply(text=text, prompt_tokens=len(prompt), new_tokens=out.new_tokens,
                 prefill_s=first - run_start, decode_s=(times[-1] if times else finished) - first,
                 compile_s=out.compile_s)
