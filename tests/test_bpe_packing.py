"""Byte-level BPE tokenizer and packed rows with segment ids."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmx.families.lm import recipe as lm_recipe
from llmx.data import packing
from llmx.data.bpe_tokenizer import END_OF_TEXT, BPETokenizer
from llmx.data.corpus import DataError
from llmx.families.lm.model import GPT, GPTConfig
from tests.conftest import load_config


@pytest.fixture(scope="module")
def shakespeare(data_dir_module):
  return (data_dir_module / "tinyshakespeare.txt").read_text()


@pytest.fixture(scope="module")
def data_dir_module():
  import os
  import pathlib
  return pathlib.Path(os.environ["LLMX_DATA_DIR"])


@pytest.fixture(scope="module")
def tokenizer(shakespeare):
  return BPETokenizer.train(shakespeare[:100_000], 400)


def random_unicode(rng, n):
  """Code points from every plane, no surrogates (not encodable in UTF-8)."""
  points = []
  while len(points) < n:
    scale = rng.choice([0x80, 0x800, 0x10000, 0x110000])
    c = int(rng.integers(0, scale))
    if not 0xD800 <= c < 0xE000:
      points.append(c)
  return "".join(map(chr, points))


def test_round_trip_on_random_unicode(tokenizer):
  rng = np.random.default_rng(0)
  specials = ["", "\x00", "e\u0301", "\U0001F600\u200d\U0001F680", END_OF_TEXT, "  \n\n\t ",
              "\ufeff", "\U0010FFFF"]
  for i in range(40):
    text = random_unicode(rng, int(rng.integers(1, 200))) + specials[i % len(specials)]
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and (ids < tokenizer.vocab_size).all()
    assert tokenizer.decode(ids) == text
  assert tokenizer.vocab_size == 400
  assert tokenizer.encode(END_OF_TEXT).tolist() == [tokenizer.end_of_text_id]


def test_learns_merges_and_round_trips_the_corpus(tokenizer, shakespeare):
  text = shakespeare[200_000:230_000]  # not seen in training
  ids = tokenizer.encode(text)
  assert len(ids) < 0.7 * len(text)  # 143 merges already save a third of the tokens
  assert tokenizer.decode(ids) == text


def test_deterministic_training_json_round_trip_and_files(tokenizer, shakespeare, tmp_path):
  again = BPETokenizer.train(shakespeare[:100_000], 400)
  assert again == tokenizer
  assert again.to_json_string() == tokenizer.to_json_string()
  restored = lm_recipe.tokenizer_from_json(tokenizer.to_json())
  assert restored == tokenizer and isinstance(restored, BPETokenizer)
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  loaded = BPETokenizer.from_file(str(tmp_path / "tokenizer.json"))
  assert loaded.encode("Wherefore art thou").tolist() == tokenizer.encode("Wherefore art thou").tolist()
  assert BPETokenizer.train(shakespeare[:100_000], 300) != tokenizer


def test_tokenizer_errors(tmp_path):
  with pytest.raises(DataError, match=r"data.vocab_size=200: a byte-level BPE vocabulary needs at least 257"):
    BPETokenizer.train("some text", 200)
  with pytest.raises(DataError, match=r"data.tokenizer_path='.*nope.json': no such file"):
    BPETokenizer.from_file(str(tmp_path / "nope.json"))
  (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
  with pytest.raises(DataError, match="not a valid tokenizer.json"):
    BPETokenizer.from_file(str(tmp_path / "bad.json"))


def test_pretrained_tokenizer_path_and_character_split(tmp_path, tokenizer, shakespeare):
  """data.tokenizer_path loads a tokenizer.json; the validation split is the same characters
  whatever the tokenizer, so losses per character compare."""
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "text.txt").write_text(shakespeare[:50_000])
  c = load_config("lm.py:llama_tiny")
  c.data.update(path=str(tmp_path / "text.txt"), tokenizer_path=str(tmp_path / "tokenizer.json"))
  tok, train, val = lm_recipe.load_tokens(c)
  assert tok == tokenizer
  assert tok.decode(val) == lm_recipe.validation_text(c) == shakespeare[45_000:50_000]
  assert tok.decode(train) == shakespeare[:45_000]


def documents(rng, lengths, vocab=31):
  return [rng.integers(1, vocab, n).astype(np.int32) for n in lengths]


def test_packing_layout():
  rng = np.random.default_rng(1)
  docs = documents(rng, [5, 9, 1, 3, 30, 12, 7, 2])  # 30 > row length: split in pieces
  packed = packing.pack_documents(docs, row_length=13, seed=4)
  rows = packed.rows
  assert rows.shape[1:] == (3, 13) and rows.dtype == np.int32
  inputs, targets, positions, segments = packing.split_packed(rows)
  # Every target is predicted once: each document but the 1-token one, all tokens but its first.
  assert (targets != packing.IGNORE).sum() == sum(len(d) - 1 for d in docs if len(d) >= 2)
  pieces = []
  for row in rows:
    for s in range(1, row[packing.SEGMENT_IDS].max() + 1):
      where = row[packing.SEGMENT_IDS] == s
      np.testing.assert_array_equal(row[packing.POSITIONS][where], np.arange(where.sum()))
      pieces.append(row[packing.TOKENS][where])
  # The long document comes back from its pieces, which overlap by one token.
  long_doc = docs[4]
  starts = [i for i, p in enumerate(pieces) if np.array_equal(p, long_doc[:13])]
  assert len(starts) == 1
  joined = np.concatenate([pieces[starts[0]]] + [p[1:] for p in pieces[starts[0] + 1:starts[0] + 3]])
  np.testing.assert_array_equal(joined, long_doc)
  assert 0.5 < packed.fill <= 1.0


@nnx.jit
def token_losses(model, inputs, targets, **kwargs):
  return model.token_losses(inputs, targets, **kwargs)


def test_packed_rows_give_the_per_document_loss_of_unpacked_documents():
  rng = np.random.default_rng(2)
  docs = documents(rng, [6, 11, 4, 9, 3, 13, 8])
  packed = packing.pack_documents(docs, row_length=17, seed=0).rows
  for kw in (dict(), dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1)):
    model = GPT(GPTConfig(vocab_size=31, block_size=16, n_layer=2, n_head=2, d_model=16, **kw),
                rngs=nnx.Rngs(3))
    inputs, targets, positions, segments = packing.split_packed(jnp.asarray(packed))
    losses = np.asarray(token_losses(model, inputs, targets, positions=positions,
                                     segment_ids=segments)).reshape(targets.shape)
    got = {}  # document -> the losses of its tokens 1..n-1 in the packed rows
    for row, row_losses in zip(packed, losses):
      for s in range(1, row[packing.SEGMENT_IDS].max() + 1):
        slots = np.flatnonzero(row[packing.SEGMENT_IDS] == s)
        got[tuple(row[packing.TOKENS][slots])] = row_losses[slots[:-1]]
    assert len(got) == len(docs)
    # Each document alone in its own row, from position 0 (the padding after it is invisible
    # to it under causal attention).
    alone = np.zeros((len(docs), 17), np.int32)
    for i, doc in enumerate(docs):
      alone[i, :len(doc)] = doc
    alone_losses = np.asarray(token_losses(model, jnp.asarray(alone[:, :-1]),
                                           jnp.asarray(alone[:, 1:]))).reshape(len(docs), 16)
    for doc, doc_losses in zip(docs, alone_losses):
      np.testing.assert_allclose(got[tuple(doc)], doc_losses[:len(doc) - 1], atol=2e-5, rtol=0)
    # The training loss of packed batches is the mean over the documents' tokens.
    mean = np.mean(np.concatenate([got[tuple(d)] for d in docs]))
    np.testing.assert_allclose(nnx.jit(lm_recipe.lm_loss)(model, jnp.asarray(packed)), mean,
                               rtol=1e-5)


def test_packed_batches_by_index_by_process_and_from_a_checkpointed_state():
  rng = np.random.default_rng(3)
  packed = packing.pack_documents(documents(rng, rng.integers(2, 9, 60)), row_length=9)
  n = len(packed)
  ds = packing.packed_batches(packed, batch_size=4, seed=5)
  assert ds[3].shape == (4, 3, 9)
  np.testing.assert_array_equal(ds[3], packing.packed_batches(packed, batch_size=4, seed=5)[3])
  parts = [packing.packed_batches(packed, batch_size=4, seed=5, process_index=p, process_count=2)[3]
           for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts), ds[3])
  # An epoch visits every row once, in a new order each epoch.
  steps_per_epoch = n // 4
  first = np.concatenate([ds[i] for i in range(steps_per_epoch)])
  assert len({r.tobytes() for r in first}) == len(first)
  second = np.concatenate([ds[i] for i in range(steps_per_epoch, 2 * steps_per_epoch)])
  assert not np.array_equal(first, second)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = next(it)
  resumed = iter(packing.packed_batches(packed, batch_size=4, seed=5))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed), expected)
  with pytest.raises(ValueError, match="batch_size=5 is not divisible by 2 processes"):
    packing.packed_batches(packed, batch_size=5, seed=0, process_count=2)
  with pytest.raises(ValueError, match="no document has 2 or more tokens"):
    packing.pack_documents([np.array([3])], row_length=9)
