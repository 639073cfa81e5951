import numpy as np
import pytest

from llmx.data import corpus, lm_windows
from llmx.data.char_tokenizer import CharTokenizer


def test_char_tokenizer_round_trip_on_shakespeare(data_dir):
  text = (data_dir / "tinyshakespeare.txt").read_text()
  tok = CharTokenizer.from_text(text)
  assert tok.vocab_size == 65  # shared/data/README.md: 65 distinct characters
  ids = tok.encode(text[:5000])
  assert ids.dtype == np.int32 and ids.max() < 65
  assert tok.decode(ids) == text[:5000]
  assert CharTokenizer.from_json(tok.to_json()) == tok


def test_unknown_character_is_named():
  tok = CharTokenizer.from_text("abc")
  with pytest.raises(corpus.DataError, match=r"'é' \(U\+00E9\)"):
    tok.encode("abé")


def test_embedded_corpus_is_real_text():
  text = corpus.embedded_corpus()
  assert len(text) > 300_000 and "the" in text and len(set(text)) > 60


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(corpus.DataError, match="data.path='.*nope.txt': no such file"):
    corpus.load_text(str(tmp_path / "nope.txt"))
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(corpus.DataError, match="empty"):
    corpus.load_text(str(tmp_path / "empty.txt"))


def test_batches_are_windows_with_shifted_targets_and_split_by_process():
  tokens = np.arange(10_000, dtype=np.int32)
  ds = lm_windows.lm_batches(tokens, block_size=16, batch_size=8, seed=3)
  batch = ds[5]
  assert batch.shape == (8, 17)
  np.testing.assert_array_equal(np.diff(batch, axis=1), 1)  # contiguous windows
  parts = [lm_windows.lm_batches(tokens, block_size=16, batch_size=8, seed=3, process_index=p,
                                 process_count=4)[5] for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), batch)
  assert not np.array_equal(ds[5], ds[6])
