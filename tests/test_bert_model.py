"""BERT model: an independent NumPy forward pass, padding invariance, heads, Hugging Face folders."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from llmx.data.wordpiece import WordPieceTokenizer
from llmx.families.bert import hf as bert_hf, model as bert
from llmx.families.bert.model import (BertConfig, BertForPreTraining, BertForQuestionAnswering,
                              BertForSequenceClassification, BertForTokenClassification, BertModel)
from llmx.train.step import supervised

CONFIG = BertConfig(vocab_size=97, hidden_size=24, num_layers=2, num_heads=3, intermediate_size=40,
                    max_position_embeddings=40, dropout=0.0)


def random_model(config=CONFIG, seed=0):
  model = BertModel(config, rngs=nnx.Rngs(seed))
  # Non-trivial biases and norm parameters, so a mapping mistake cannot hide behind zeros/ones.
  rng = np.random.default_rng(seed)
  for path, p in nnx.iter_graph(model):
    if isinstance(p, nnx.Param) and p.ndim == 1:
      p[...] = p[...] + jnp.asarray(rng.normal(0, 0.1, p.shape), jnp.float32)
  return model


def jitted(model):
  """model's forward as one compiled function (eager calls compile every op separately)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
  return lambda *args: fn(state, *args)


def random_batch(rng, batch, seq, vocab, *, min_len=3):
  lengths = rng.integers(min_len, seq + 1, batch)
  mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask, rng.integers(5, vocab, (batch, seq)), 0).astype(np.int32)
  types = np.where((np.arange(seq)[None] >= lengths[:, None] // 2) & (mask > 0), 1, 0).astype(np.int32)
  return ids, mask, types


erf = np.vectorize(math.erf)


def numpy_bert(w: dict, c: BertConfig, ids, mask, types):
  """BERT forward from Hugging Face-layout weights (out, in), written from the paper/HF code."""
  def ln(x, p):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + c.layer_norm_epsilon) * w[p + ".weight"] + w[p + ".bias"]

  def dense(x, p):
    return x @ w[p + ".weight"].T + w[p + ".bias"]

  b, t = ids.shape
  x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t]
       + w["embeddings.token_type_embeddings.weight"][types])
  x = ln(x.astype(np.float64), "embeddings.LayerNorm")
  h, d = c.num_heads, c.hidden_size // c.num_heads
  additive = np.where(mask[:, None, None, :] > 0, 0.0, -1e9)
  for i in range(c.num_layers):
    p = f"encoder.layer.{i}."
    split = lambda y: y.reshape(b, t, h, d).transpose(0, 2, 1, 3)
    q, k, v = (split(dense(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + additive
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    a = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
    x = ln(x + dense(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    f = dense(x, p + "intermediate.dense")
    f = 0.5 * f * (1 + erf(f / math.sqrt(2)))
    x = ln(x + dense(f, p + "output.dense"), p + "output.LayerNorm")
  pooled = np.tanh(dense(x[:, 0], "pooler.dense"))
  return x, pooled


def test_matches_numpy_reference_and_hf_export():
  rng = np.random.default_rng(1)
  model = random_model()
  model.eval()
  ids, mask, types = random_batch(rng, 5, 13, CONFIG.vocab_size)
  out = jitted(model)(ids, mask, types)
  assert out.last_hidden_state.shape == (5, 13, 24) and out.pooler_output.shape == (5, 24)
  ref_hidden, ref_pooled = numpy_bert(bert_hf.state_dict(model), CONFIG, ids, mask, types)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out.last_hidden_state)[real], ref_hidden[real], atol=2e-5)
  np.testing.assert_allclose(out.pooler_output, ref_pooled, atol=2e-5)


def test_padding_does_not_change_outputs():
  rng = np.random.default_rng(2)
  model = random_model(seed=3)
  model.eval()
  ids, mask, types = random_batch(rng, 3, 11, CONFIG.vocab_size)
  forward = jitted(model)
  base = forward(ids, mask, types)
  extra = 17  # more padding after every row
  pad = lambda a: np.pad(a, ((0, 0), (0, extra)))
  padded = forward(pad(ids), pad(mask), pad(types))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(padded.last_hidden_state)[:, :11][real],
                             np.asarray(base.last_hidden_state)[real], atol=1e-5)
  np.testing.assert_allclose(padded.pooler_output, base.pooler_output, atol=1e-5)
  emb = bert.sentence_embeddings(base.last_hidden_state, mask)
  emb_padded = bert.sentence_embeddings(padded.last_hidden_state, pad(mask))
  np.testing.assert_allclose(emb_padded, emb, atol=1e-6)
  # Each row alone, unpadded and without a mask, gives the same again.
  for i in range(3):
    n = int(mask[i].sum())
    alone = forward(ids[i:i + 1, :n], np.ones((1, n), np.int32), types[i:i + 1, :n])
    np.testing.assert_allclose(alone.last_hidden_state[0], base.last_hidden_state[i, :n], atol=1e-5)
  # Without the mask the padding would be attended to: the test can fail.
  unmasked = forward(pad(ids), np.ones_like(pad(mask)), pad(types))
  assert np.abs(np.asarray(unmasked.last_hidden_state)[:, :11][real]
                - np.asarray(base.last_hidden_state)[real]).max() > 1e-3


def test_sentence_embeddings_match_numpy():
  rng = np.random.default_rng(4)
  hidden = rng.normal(size=(4, 7, 5)).astype(np.float32)
  mask = (np.arange(7)[None] < np.array([[1], [7], [3], [5]])).astype(np.int32)
  mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(bert.mean_pool(hidden, mask), mean, rtol=1e-6)
  emb = np.asarray(bert.sentence_embeddings(hidden, mask))
  np.testing.assert_allclose(emb, mean / np.linalg.norm(mean, axis=1, keepdims=True), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)


def test_sequence_longer_than_max_positions():
  model = random_model()
  ids = np.ones((2, CONFIG.max_position_embeddings + 1), np.int32)
  with pytest.raises(bert.SequenceTooLongError, match=r"sequence length 41 exceeds the model's "
                                                      r"max_position_embeddings=40"):
    model(ids)
  assert nnx.eval_shape(lambda m: m(ids[:, :40]), model).last_hidden_state.shape == (2, 40, 24)


def _head_batch(rng, b=4, t=9):
  ids, mask, types = random_batch(rng, b, t, CONFIG.vocab_size, min_len=5)
  return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


@pytest.mark.parametrize("head", ["pretraining", "sequence_cls", "sequence_mean", "token", "qa"])
def test_head_shapes_and_gradient_step(head):
  rng = np.random.default_rng(5)
  rngs = nnx.Rngs(params=0, dropout=1)
  encoder = BertModel(CONFIG, rngs=rngs)
  batch = _head_batch(rng)
  b, t = batch["input_ids"].shape
  ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
  loss_fn = lambda m, x: m.loss(x)
  if head == "pretraining":
    model = BertForPreTraining(encoder, rngs=rngs)
    batch.update(mlm_positions=np.array([[1, 2, 0]] * b, np.int32),
                 mlm_labels=np.array([[7, 8, -100]] * b, np.int32),
                 nsp_label=np.array([0, 1] * (b // 2), np.int32))
    loss_fn = lambda m, x: m.loss(x["input_ids"], x["attention_mask"], x["token_type_ids"],
                                  x["mlm_labels"], x["nsp_label"], mlm_positions=x["mlm_positions"])
    full_labels = np.full((b, t), -100, np.int32)
    full_labels[:, 1:3] = [7, 8]
    model.eval()
    graphdef, params = nnx.split(model)

    def outputs(params):
      m = nnx.merge(graphdef, params)
      _, gathered = loss_fn(m, batch)
      _, full = m.loss(ids, mask, types, full_labels, batch["nsp_label"])  # labels at every position
      return m(ids, mask, types), gathered, full

    (mlm, nsp), gathered, full = jax.jit(outputs)(params)
    assert mlm.shape == (b, t, CONFIG.vocab_size) and nsp.shape == (b, 2)
    # The fused, gathered MLM loss equals cross-entropy of the full logits at those positions.
    logp = jax.nn.log_softmax(mlm[:, 1:3], -1)
    expected = -(logp[:, 0, 7].mean() + logp[:, 1, 8].mean()) / 2
    np.testing.assert_allclose(gathered["mlm_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(full["mlm_loss"], expected, rtol=1e-5)
    accuracy = ((np.argmax(mlm[:, 1], -1) == 7).mean() + (np.argmax(mlm[:, 2], -1) == 8).mean()) / 2
    np.testing.assert_allclose(gathered["mlm_accuracy"], accuracy)
    nsp_logp = jax.nn.log_softmax(nsp, -1)
    np.testing.assert_allclose(gathered["nsp_loss"], -nsp_logp[np.arange(b), batch["nsp_label"]].mean(), rtol=1e-5)
    model.train()
  elif head.startswith("sequence"):
    model = BertForSequenceClassification(encoder, 3, pooling=head.split("_")[1], dropout=0.1, rngs=rngs)
    assert nnx.eval_shape(lambda m: m(ids, mask), model).shape == (b, 3)
    batch["labels"] = np.array([0, 1, 2, 1], np.int32)
  elif head == "token":
    model = BertForTokenClassification(encoder, 5, rngs=rngs)
    assert nnx.eval_shape(lambda m: m(ids, mask), model).shape == (b, t, 5)
    batch["labels"] = np.where(mask > 0, rng.integers(0, 5, (b, t)), -100).astype(np.int32)
  else:
    model = BertForQuestionAnswering(encoder, rngs=rngs)
    start, end = jitted(model)(ids, mask, types)
    assert start.shape == end.shape == (b, t)
    assert np.all(np.asarray(start)[mask == 0] < -1e8)  # padding never answers
    batch.update(start_positions=np.array([1, 2, 3, 0], np.int32),
                 end_positions=np.array([2, 2, 4, 0], np.int32))
  trainable = supervised(model, optax.adam(3e-3), loss_fn)
  state = trainable.init()
  before = jax.tree.map(np.asarray, state["params"])
  step = jax.jit(trainable.train_step)
  losses = []
  for _ in range(4):
    state, metrics = step(state, batch)
    losses.append(float(metrics["train_loss"]))
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
  assert losses[-1] < losses[0], losses
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state["params"], before)
  unchanged = [jax.tree_util.keystr(path) for path, c in jax.tree_util.tree_leaves_with_path(changed) if not c]
  # Only the pretraining head and CLS pooling use the pooler; every other parameter must move.
  assert len(unchanged) == (0 if head in ("pretraining", "sequence_cls") else 2), unchanged
  assert all("pooler" in name for name in unchanged), unchanged


def test_hf_folder_round_trip(tmp_path):
  rng = np.random.default_rng(6)
  rngs = nnx.Rngs(3)
  model = BertForPreTraining(random_model(seed=4), rngs=rngs)
  model.eval()
  bert_hf.save_pretrained(model, tmp_path / "pre")
  names = load_file(str(tmp_path / "pre" / "model.safetensors"))
  assert "bert.encoder.layer.1.attention.self.key.weight" in names
  assert names["bert.encoder.layer.0.intermediate.dense.weight"].shape == (40, 24)  # (out, in)
  encoder = bert_hf.from_pretrained(tmp_path / "pre")  # cls.* heads skipped, "bert." prefix stripped
  # Loaded ready for inference (dropout off), even with a dropout rate for fine-tuning.
  full = bert_hf.from_pretrained(tmp_path / "pre", with_pretraining_heads=True, dropout=0.3)
  assert full.bert.config.dropout == 0.3 and full.deterministic and full.bert.layers[0].mlp_dropout.deterministic
  ids, mask, types = random_batch(rng, 2, 10, CONFIG.vocab_size)
  for a, b in zip(jitted(full)(ids, mask, types), jitted(model)(ids, mask, types)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_array_equal(nnx.state(encoder, nnx.Param)["embeddings"]["word"]["embedding"][...],
                                model.bert.embeddings.word.embedding[...])
  np.testing.assert_array_equal(encoder.layers[1].attn.qkv.kernel[...], model.bert.layers[1].attn.qkv.kernel[...])
  # An encoder-only folder cannot provide the heads.
  bert_hf.save_pretrained(model.bert, tmp_path / "enc")
  with pytest.raises(bert_hf.CheckpointFormatError, match=r"missing weights \(7\): cls.predictions"):
    bert_hf.from_pretrained(tmp_path / "enc", with_pretraining_heads=True)


def test_not_a_bert_checkpoint(tmp_path):
  err = bert_hf.CheckpointFormatError
  with pytest.raises(err, match="no such folder"):
    bert_hf.from_pretrained(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(err, match="is not a Hugging Face checkpoint: no config.json"):
    bert_hf.from_pretrained(tmp_path / "empty")
  gpt = tmp_path / "gpt2"
  gpt.mkdir()
  (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(err, match=r"model_type='gpt2', not 'bert'"):
    bert_hf.from_pretrained(gpt)

  folder = bert_hf.save_pretrained(random_model(), tmp_path / "good")
  weights = load_file(str(folder / "model.safetensors"))
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text((folder / "config.json").read_text())
  (pickled / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(err, match=r"no model.safetensors.*pytorch_model.bin are pickle"):
    bert_hf.from_pretrained(pickled)

  def variant(name, change):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text((folder / "config.json").read_text())
    w = dict(weights)
    change(w)
    save_file(w, str(d / "model.safetensors"))
    return d

  missing = variant("missing", lambda w: [w.pop("encoder.layer.1.output.dense.bias"),
                                          w.pop("encoder.layer.0.attention.self.value.weight")])
  with pytest.raises(err, match=r"missing weights \(2\): encoder.layer.0.attention.self.value.weight, "
                                r"encoder.layer.1.output.dense.bias"):
    bert_hf.from_pretrained(missing)
  extra = variant("extra", lambda w: w.update({"encoder.layer.2.output.dense.bias": np.zeros(24, np.float32)}))
  with pytest.raises(err, match=r"unexpected weights \(1\).*encoder.layer.2.output.dense.bias"):
    bert_hf.from_pretrained(extra)
  shaped = variant("shaped", lambda w: w.update({"pooler.dense.weight": np.zeros((24, 23), np.float32)}))
  with pytest.raises(err, match=r"mis-shaped weights \(1\): pooler.dense.weight in model.safetensors: \(24, 23\), expected \(24, 24\)"):
    bert_hf.from_pretrained(shaped)


def test_wordpiece_tokenizer_train_save_load(tmp_path):
  texts = ["the cat sat on the mat.", "a dog chased the cat!", "Cats and dogs, dogs and cats."] * 20
  tok = WordPieceTokenizer.train(texts, vocab_size=80)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  enc = tok(["the cat", "a dog chased the cat"], ["sat", "on the mat"])
  assert enc["input_ids"].shape == enc["token_type_ids"].shape == enc["attention_mask"].shape
  row = enc["input_ids"][0]
  n = int(enc["attention_mask"][0].sum())
  assert row[0] == tok.cls_id and row[n - 1] == tok.sep_id and np.all(row[n:] == tok.pad_id)
  assert list(enc["token_type_ids"][0, :n]) == [0] * (n - 2) + [1, 1]  # [CLS] the cat [SEP] | sat [SEP]
  assert tok.decode(row) == "the cat sat"
  tok.save(tmp_path)
  again = WordPieceTokenizer.from_folder(tmp_path)
  assert again.fingerprint() == tok.fingerprint()
  truncated = tok(["the cat sat on the mat " * 10], max_length=12)
  assert truncated["input_ids"].shape == (1, 12) and truncated["input_ids"][0, -1] == tok.sep_id
