"""The encoder-decoder Transformer, the translation data pipeline and experiment (its decoding:
tests/test_inference.py)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmx.families.seq2seq import evaluate, recipe as setup
from llmx.inference.prompts import pad_sources
from llmx.data import translation as data_lib
from llmx.families.seq2seq.model import Transformer, TransformerConfig
from llmx.train import optimizers
from llmx.train.config_check import ConfigError
from tests.conftest import cli, load_config

BOS, EOS = 1, 2


def tiny_model(*, vocab=29, norm="pre", seed=0, peaky=3.0, **overrides):
  """A random model; `peaky` scales the embedding table so that its next-token distributions
  are far from uniform (and </s> comes up) like a trained model's."""
  fields = dict(vocab_size=vocab, max_len=24, d_model=32, n_head=4, n_encoder_layers=2,
                n_decoder_layers=2, mlp_hidden=48, dropout=0.0, norm=norm)
  fields.update(overrides)
  model = Transformer(TransformerConfig(**fields), rngs=nnx.Rngs(seed))
  model.tgt_embed.embedding[...] = model.tgt_embed.embedding[...] * peaky
  model.eval()
  return model


def random_sources(rng, lengths, vocab):
  return [np.concatenate([rng.integers(4, vocab, size=n), [EOS]]).astype(np.int32)
          for n in lengths]


# ---------------------------------------------------------------- model
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_decoder_is_causal(norm):
  """d(decoder output at t) / d(input at s) is exactly 0 for s > t and not 0 for s <= t."""
  model = tiny_model(norm=norm, seed=1)
  rng = np.random.default_rng(0)
  src = jnp.asarray(data_lib_pad(random_sources(rng, [5, 3], 29)))
  memory, src_valid = model.encode(src)
  b, t_len = 2, 7
  x = jnp.asarray(rng.normal(size=(b * t_len, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(32,)), jnp.float32)  # not a plain sum: LayerNorm output sums to a constant
  @jax.jit  # one compilation for the three positions (eager ops would compile one by one)
  def input_grad_norms(x, t):
    def out_at_t(x):
      h = model.decoder_layers(x, memory, src_valid, batch=b).reshape(b, t_len, -1)
      return (jax.lax.dynamic_index_in_dim(h, t, axis=1, keepdims=False) @ w).sum()
    return jnp.abs(jax.grad(out_at_t)(x)).reshape(b, t_len, -1).sum(-1)

  for t in (0, 3, 6):
    g = np.asarray(input_grad_norms(x, t))
    assert np.all(g[:, t + 1:] == 0), (t, g)
    assert np.all(g[:, :t + 1] > 0), (t, g)


def data_lib_pad(sources, width=None):
  batch, _ = pad_sources(sources, max_len=24, pad_id=0)
  if width is not None:
    batch = np.pad(batch, ((0, 0), (0, width - batch.shape[1])))
  return batch


def test_cross_attention_ignores_source_padding():
  model = tiny_model(seed=2)
  rng = np.random.default_rng(1)
  sources = random_sources(rng, [3, 6, 9], 29)
  tgt_in = jnp.asarray(rng.integers(4, 29, size=(3, 5)), jnp.int32).at[:, 0].set(BOS)
  narrow = jnp.asarray(data_lib_pad(sources))             # 16 wide
  wide = jnp.asarray(data_lib_pad(sources, width=23))
  forward = jax.jit(lambda src: model(src, tgt_in))
  a, b = forward(narrow), forward(wide)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  # Garbage in the padded rows of the memory changes nothing either.
  memory, src_valid = jax.jit(model.encode)(wide)
  garbage = jnp.where(src_valid.reshape(-1, 1), memory, 1e3 * jnp.asarray(
      rng.normal(size=memory.shape), jnp.float32))
  decode = jax.jit(lambda memory: model.decode(tgt_in, memory, src_valid))
  np.testing.assert_allclose(np.asarray(decode(memory)), np.asarray(decode(garbage)), atol=1e-5)
  # ...while a real source token does matter.
  changed = wide.at[0, 0].set((wide[0, 0] + 1 - 4) % 25 + 4)
  assert not np.allclose(np.asarray(forward(changed))[0], np.asarray(b)[0], atol=1e-3)


def test_loss_is_label_smoothed_cross_entropy():
  model = tiny_model(seed=3, peaky=1.0)
  rng = np.random.default_rng(2)
  src = jnp.asarray(data_lib_pad(random_sources(rng, [4, 7], 29)))
  tgt_in = jnp.asarray(rng.integers(4, 29, size=(2, 6)), jnp.int32)
  tgt_out = np.asarray(rng.integers(4, 29, size=(2, 6)), np.int32)
  tgt_out[1, 4:] = -100
  logp = np.asarray(jax.jit(lambda: jax.nn.log_softmax(model(src, tgt_in), axis=-1))())
  logp = logp.reshape(12, -1)
  labels = tgt_out.reshape(-1)
  keep = labels != -100
  s = 0.1
  ref = -((1 - s) * logp[keep, labels[keep]] + s * logp[keep].mean(-1)).mean()
  got = float(jax.jit(lambda: model.loss(src, tgt_in, jnp.asarray(tgt_out), label_smoothing=s))())
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_schedules():
  c = load_config("translation.py:smoke")
  c.train.update(schedule="rsqrt", learning_rate=2e-3, warmup_steps=100)
  _, rsqrt = optimizers.from_config(c.train)
  np.testing.assert_allclose([float(rsqrt(s)) for s in (0, 49, 99, 399)],
                             [2e-5, 1e-3, 2e-3, 1e-3], rtol=1e-5)
  c.train.update(schedule="cosine", steps=1000, min_learning_rate=1e-5)
  _, cosine = optimizers.from_config(c.train)
  assert float(cosine(100)) == pytest.approx(2e-3) and float(cosine(1000)) == pytest.approx(1e-5)


# ---------------------------------------------------------------- data
def test_malformed_lines_name_their_line_number():
  good = "Go.\tVa !\nRun!\tCours !\n"
  assert data_lib.parse_pairs(good + "\n") == [("Go.", "Va !"), ("Run!", "Cours !")]
  with pytest.raises(data_lib.TranslationDataError, match=r"x.txt, line 3: expected "
                     r"'source<TAB>target', found no tab"):
    data_lib.parse_pairs(good + "Hello there\n", source="x.txt")
  with pytest.raises(data_lib.TranslationDataError, match="line 2: empty source sentence"):
    data_lib.parse_pairs("Go.\tVa !\n \tCours !\n")
  with pytest.raises(data_lib.TranslationDataError, match="line 1: empty target sentence"):
    data_lib.parse_pairs("Go.\t\n")


def test_malformed_data_file_is_one_line_error(tmp_path):
  path = tmp_path / "pairs.txt"
  path.write_text("Go.\tVa !\nbroken line\n", encoding="utf-8")
  c = load_config("translation.py:smoke")
  c.data.path = str(path)
  with pytest.raises(data_lib.TranslationDataError, match="line 2"):
    setup.load_data(c)


def small_corpus(n=400, seed=0):
  rng = np.random.default_rng(seed)
  words = ["the", "cat", "dog", "eats", "sees", "a", "big", "small", "red", "house", "runs"]
  mots = ["le", "chat", "chien", "mange", "voit", "un", "grand", "petit", "rouge", "maison", "court"]
  pairs = []
  for _ in range(n):
    idx = rng.integers(0, len(words), size=rng.integers(1, 12))
    pairs.append((" ".join(words[i] for i in idx).capitalize() + ".",
                  " ".join(mots[i] for i in idx).capitalize() + " !"))
  return pairs


def test_split_tokenizer_and_token_batches():
  pairs = small_corpus()
  split = data_lib.split_pairs(pairs, num_val=30, num_test=40, seed=7)
  again = data_lib.split_pairs(pairs, num_val=30, num_test=40, seed=7)
  assert (len(split.test), len(split.val), len(split.train)) == (40, 30, 330)
  assert split == again and split.test != data_lib.split_pairs(pairs, num_val=30, num_test=40,
                                                               seed=8).test
  tok = data_lib.SubwordTokenizer.train([s for p in split.train for s in p], 80)
  assert tok.vocab_size == 80
  for en, fr in split.test[:10]:  # detokenisation restores the text
    assert tok.decode(tok.encode(fr)) == fr and tok.decode(tok.encode(en)) == en
  assert tok.decode(np.concatenate([tok.encode("Le chat"), [tok.eos_id], tok.encode("x")])) == "Le chat"
  again_tok = data_lib.SubwordTokenizer.train([s for p in split.train for s in p], 80)
  assert again_tok.to_json() == tok.to_json()  # deterministic: resumed runs match
  data = data_lib.encode_pairs(tok, split.train, max_len=24)
  assert data.dropped == sum(1 for en, fr in split.train
                             if len(tok.encode(en)) + 1 > 24 or len(tok.encode(fr)) + 1 > 24)
  batches = data_lib.TokenBatches(data, tokens_per_batch=200, max_len=24, seed=3, row_multiple=2)
  seen = []
  for step in range(batches.batches_per_epoch):
    b = batches[step]
    rows, length = b["src"].shape
    assert rows * length <= 200 and length in batches.buckets
    for r in range(rows):
      if b["src"][r, 0] == 0:  # a padding row at the end of a bucket
        continue
      n = int((b["src"][r] != 0).sum())
      key = tuple(b["src"][r, :n])
      seen.append(key)
      m = int((b["tgt_out"][r] != -100).sum())
      assert b["tgt_in"][r, 0] == tok.bos_id and b["tgt_out"][r, m - 1] == tok.eos_id
      np.testing.assert_array_equal(b["tgt_in"][r, 1:m], b["tgt_out"][r, :m - 1])
      # Similar lengths: each row fills more than the previous bucket's length.
      smaller = [L for L in batches.buckets if L < length]
      assert not smaller or max(n, m) > smaller[-1]
  assert sorted(seen) == sorted(tuple(s) for s in data.src)  # each pair once per epoch
  # Indexed by step: a fresh pipeline (a resumed run) gives the same batches, epochs differ.
  fresh = data_lib.TokenBatches(data, tokens_per_batch=200, max_len=24, seed=3, row_multiple=2)
  ds = data_lib.train_batches(fresh)
  for step in (0, 5, batches.batches_per_epoch + 2):
    for k in ("src", "tgt_in", "tgt_out"):
      np.testing.assert_array_equal(ds[step][k], batches[step][k])
  first = [batches[i]["src"].tobytes() for i in range(batches.batches_per_epoch)]
  second = [batches[batches.batches_per_epoch + i]["src"].tobytes()
            for i in range(batches.batches_per_epoch)]
  assert first != second and sorted(first) != sorted(second) or first != second
  with pytest.raises(data_lib.TranslationDataError, match="tokens_per_batch=40"):
    data_lib.TokenBatches(data, tokens_per_batch=40, max_len=24, seed=3)


def test_translate_text_errors():
  pairs = small_corpus(200)
  tok = data_lib.SubwordTokenizer.train([s for p in pairs for s in p], 80)
  model = tiny_model(vocab=tok.vocab_size, seed=7)
  out, truncated = evaluate.translate(model, tok, ["The cat.", "A big red dog runs."], beam_size=2)
  assert len(out) == 2 and truncated == 0 and all(isinstance(s, str) for s in out)
  with pytest.raises(evaluate.TranslationError, match="sentence 1 is empty"):
    evaluate.translate(model, tok, ["The cat.", "   "])
  long = " ".join(["the big red house"] * 10)
  with pytest.raises(evaluate.TranslationError, match="more than the model's max_len=24"):
    evaluate.translate(model, tok, [long])
  _, truncated = evaluate.translate(model, tok, [long, "The cat."], beam_size=2, truncate=True)
  assert truncated == 1


@pytest.mark.parametrize("section, field, value, message", [
    ("model", "d_model", 31, "model.d_model=31 is not divisible by model.n_head=2"),
    ("model", "norm", "sandwich", "model.norm='sandwich'"),
    ("train", "label_smoothing", 1.5, r"train.label_smoothing=1.5: must lie in \[0.0, 1.0\)"),
    ("train", "schedule", "linear", "train.schedule='linear'"),
    ("data", "max_train_len", 40, "data.max_train_len=40 exceeds model.max_len=32"),
    ("eval", "beam_size", 0, "eval.beam_size=0: must be an integer > 0"),
])
def test_config_validation(section, field, value, message):
  c = load_config("translation.py:smoke")
  c[section][field] = value
  with pytest.raises(ConfigError, match=message):
    setup.validate(c)


# ---------------------------------------------------------------- experiment
def test_train_resume_and_translate(tmp_path, data_dir):
  work = str(tmp_path / "run")
  common = ["experiments.train_translation", "--config=experiments/configs/translation.py:smoke",
            f"--workdir={work}", f"--config.data.path={data_dir / 'eng-fra.txt'}",
            "--config.data.max_pairs=1200", "--config.data.num_test=16",
            "--config.data.num_val=16", "--config.data.bleu_val_pairs=8",
            "--config.data.max_train_len=12"]  # two batch shapes: fewer compilations
  first = cli(*common, "--config.train.steps=10")
  assert "test BLEU" in first.stdout and "step 10" in first.stdout
  second = cli(*common, "--config.train.steps=12", "--config.train.lr_decay_steps=10",
               "--config.eval.test=False")
  assert "resumed" in second.stdout and "step 12" in second.stdout
  steps = [json.loads(line)["step"] for line in open(f"{work}/metrics.jsonl")]
  assert steps == [5, 10, 12]
  report = json.loads(open(f"{work}/test_bleu.json").read())
  assert report["step"] == 10 and report["pairs"] == 16 and 0 <= report["test_bleu"] <= 100
  sample = ["experiments.translate", f"--workdir={work}", "--beam_size=1", "--temperature=0.8",
            "--top_p=0.9", "--seed=0", "Hello.", "Thank you."]
  out = cli(*sample)
  assert out.stdout.count("\n") == 2  # one line per sentence (an untrained model's may be empty)
  empty = cli("experiments.translate", f"--workdir={work}", "Hello.", " ", check=False)
  assert empty.returncode == 2 and "sentence 1 is empty" in empty.stderr
  assert "Traceback" not in empty.stderr
