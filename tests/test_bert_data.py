"""BERT data: MLM masking statistics, NSP pairs, task files and their features."""
import json

import numpy as np
import pytest

from llmx.data import bert_pretraining as bp
from llmx.data import tsv
from llmx.data.corpus import DataError
from llmx.data.wordpiece import WordPieceTokenizer

MASK, VOCAB = 4, 1000
SPECIAL = np.arange(5)


def test_masking_rule_statistics():
  rng = np.random.default_rng(0)
  random_ids = np.arange(5, VOCAB)
  counts = dict(selected=0, candidates=0, masked=0, random=0, kept=0)
  for _ in range(1500):
    n = int(rng.integers(10, 61))
    tokens = rng.integers(5, VOCAB, 64).astype(np.int32)
    candidates = np.zeros(64, bool)
    candidates[1:n] = True
    candidates[n // 2] = False  # a [SEP] in the middle
    inputs, positions, labels = bp.mask_tokens(tokens, candidates, rng, mask_id=MASK,
                                               random_ids=random_ids, max_predictions=10)
    chosen = positions[labels != bp.IGNORE_INDEX]
    k = int(candidates.sum())
    assert len(chosen) == min(10, max(1, round(0.15 * k)))
    assert np.all(candidates[chosen]) and np.all(np.diff(chosen) > 0)
    assert np.array_equal(labels[:len(chosen)], tokens[chosen])
    untouched = np.setdiff1d(np.arange(64), chosen)
    assert np.array_equal(inputs[untouched], tokens[untouched])
    picked = inputs[chosen]
    assert not np.isin(picked[picked != MASK], SPECIAL).any()  # random replacements are words
    counts["selected"] += len(chosen)
    counts["candidates"] += k
    counts["masked"] += int((picked == MASK).sum())
    counts["kept"] += int((picked == tokens[chosen]).sum())
    counts["random"] += int(((picked != MASK) & (picked != tokens[chosen])).sum())
  s = counts["selected"]
  assert abs(s / counts["candidates"] - 0.15) < 0.01
  # 80/10/10 within ~4 standard errors (s is about 7,000); a random draw equal to the original
  # token (p = 1/995) counts as "kept".
  assert abs(counts["masked"] / s - 0.8) < 0.02
  assert abs(counts["random"] / s - 0.1) < 0.015
  assert abs(counts["kept"] / s - 0.1) < 0.015


def _numbered_corpus(n=400, seed=1):
  """Sentence j holds tokens that occur nowhere else, so any token tells which sentence it is."""
  rng = np.random.default_rng(seed)
  sentences, owner, next_id = [], {}, 5
  for j in range(n):
    length = int(rng.integers(1, 9))
    sentences.append(np.arange(next_id, next_id + length, dtype=np.int32))
    for t in sentences[-1]:
      owner[int(t)] = j
    next_id += length
  return sentences, owner, next_id


def test_nsp_pairs_are_balanced_and_correct():
  sentences, owner, vocab = _numbered_corpus()
  examples = bp.PretrainingExamples(sentences, max_len=29, seed=3, cls_id=2, sep_id=3, pad_id=0,
                                    mask_id=MASK, vocab_size=vocab, special_ids=SPECIAL)
  labels = []
  for i in range(2000):
    e = examples[i]
    ids = e["input_ids"].copy()
    selected = e["mlm_labels"] != bp.IGNORE_INDEX
    ids[e["mlm_positions"][selected]] = e["mlm_labels"][selected]  # undo the masking
    n = int(e["attention_mask"].sum())
    seps = np.flatnonzero(ids[:n] == 3)
    assert ids[0] == 2 and len(seps) == 2 and seps[1] == n - 1 and n <= 29
    assert np.all(ids[n:] == 0) and np.all(e["attention_mask"][n:] == 0)
    assert np.array_equal(e["token_type_ids"][:n], (np.arange(n) > seps[0]).astype(np.int32))
    a, b = ids[1:seps[0]], ids[seps[0] + 1:n - 1]
    assert len(a) and len(b)
    last_a, first_b = owner[int(a[-1])], owner[int(b[0])]
    if e["nsp_label"] == 0:
      assert first_b == last_a + 1  # B starts with the sentence right after A's last one
      assert b[0] == sentences[first_b][0]  # ... at its beginning
    else:
      assert abs(first_b - (last_a + 1)) > 2
    labels.append(int(e["nsp_label"]))
  # 2000 fair coin flips: 4 standard errors is 0.045.
  assert abs(np.mean(labels) - 0.5) < 0.045


def test_pretraining_batches_are_deterministic_and_shard_by_process():
  sentences, _, vocab = _numbered_corpus(50)
  examples = bp.PretrainingExamples(sentences, max_len=16, seed=0, cls_id=2, sep_id=3, pad_id=0,
                                    mask_id=MASK, vocab_size=vocab, special_ids=SPECIAL)
  ds = bp.pretraining_batches(examples, batch_size=6)
  b = ds[5]
  assert b["input_ids"].shape == (6, 16) and b["mlm_positions"].shape == (6, 2) and b["nsp_label"].shape == (6,)
  again = bp.pretraining_batches(examples, batch_size=6)[5]
  assert all(np.array_equal(b[k], again[k]) for k in b)
  halves = [bp.pretraining_batches(examples, batch_size=6, process_index=p, process_count=2)[5]
            for p in range(2)]
  assert np.array_equal(np.concatenate([h["input_ids"] for h in halves]), b["input_ids"])
  assert not np.array_equal(ds[6]["input_ids"], b["input_ids"])
  with pytest.raises(ValueError, match="at least 4 non-empty sentences"):
    bp.PretrainingExamples(sentences[:3], max_len=16, seed=0, cls_id=2, sep_id=3, pad_id=0,
                           mask_id=MASK, vocab_size=vocab, special_ids=SPECIAL)


def test_unigram_baseline():
  batches = [dict(mlm_labels=np.array([[7, 7, -100], [8, 7, -100]]))]
  assert bp.unigram_baseline(batches, np.array([7, 7, 8])) == 0.75


def test_tsv_malformed_row_reports_line_number(tmp_path):
  path = tmp_path / "train.tsv"
  path.write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n\nno tab here\nfine\t1\n")
  with pytest.raises(DataError, match=r"train.tsv:5: malformed row: 1 tab-separated field\(s\), "
                                      r"the header has 2"):
    tsv.read_classification(path)
  path.write_text("sentence\tlabel\ngood film\t1\nbad\tfilm\t0\n")
  with pytest.raises(DataError, match=r"train.tsv:3: malformed row: 3 tab-separated"):
    tsv.read_classification(path)
  path.write_text("text\tlabel\ngood film\t1\n")
  with pytest.raises(DataError, match=r"train.tsv:1: header \['text', 'label'\] lacks column\(s\) \['sentence'\]"):
    tsv.read_classification(path)
  path.write_text("sentence\tlabel\ngood film\t1\n\t0\n")
  with pytest.raises(DataError, match=r"train.tsv:3: malformed row: empty sentence or label"):
    tsv.read_classification(path)
  with pytest.raises(DataError, match="no such file"):
    tsv.read_classification(tmp_path / "absent.tsv")


def test_sst2_files_read(data_dir):
  dev = tsv.read_classification(data_dir / "sst2" / "dev.tsv")
  assert len(dev) == 872 and sorted({r["label"] for r in dev}) == ["0", "1"]
  assert sum(r["label"] == "1" for r in dev) == 444


def _tokenizer():
  words = "john mary lives works in at paris london the bank on monday what where who is".split()
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(words, 8)) for _ in range(200)]
  return WordPieceTokenizer.train(texts, vocab_size=120)


def test_tagging_features_label_first_subtoken(tmp_path):
  tok = _tokenizer()
  path = tmp_path / "tags.tsv"
  path.write_text("tokens\ttags\nJohn lives in Londoner\tB-PER O O B-LOC\nMary works\tB-PER O\n")
  rows = tsv.read_tagging(path)
  tags = sorted({t for r in rows for t in r["tags"]})
  feats = tsv.tagging_features(rows, tok, tags, max_length=32)
  ids, labels = feats[0]["input_ids"], feats[0]["labels"]
  assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
  # "londoner" splits into several pieces: only the first carries B-LOC.
  labelled = labels[labels != tsv.IGNORE_INDEX]
  assert [tags[i] for i in labelled] == ["B-PER", "O", "O", "B-LOC"]
  assert len(ids) > 6 and labels[0] == labels[-1] == tsv.IGNORE_INDEX
  batch = tsv.collate(feats, pad_id=tok.pad_id, length=16)
  assert batch["labels"].shape == (2, 16) and np.all(batch["labels"][1, len(feats[1]["labels"]):] == -100)
  path.write_text("tokens\ttags\nJohn lives\tB-PER O\nMary works in\tB-PER O\n")
  with pytest.raises(DataError, match=r"tags.tsv:3: malformed row: 3 word\(s\) but 2 tag\(s\)"):
    tsv.read_tagging(path)
  dev = tmp_path / "dev.tsv"
  dev.write_text("tokens\ttags\nJohn\tB-ORG\n")
  with pytest.raises(DataError, match=r"dev.tsv:2: label 'B-ORG' does not occur in the training file"):
    tsv.tagging_features(tsv.read_tagging(dev), tok, tags, max_length=32, path=dev)


def test_qa_features_find_the_answer_span(tmp_path):
  tok = _tokenizer()
  context = "mary works at the bank in london on monday"
  rows = [dict(question="where is the bank", context=context, answer_text="london",
               answer_start=context.index("london"), line=1),
          dict(question="who works", context=context, answer_text="mary works", answer_start=0, line=2)]
  feats = tsv.qa_features(rows, tok, max_length=64)
  for f, r in zip(feats, rows):
    s, e = int(f["start_positions"]), int(f["end_positions"])
    assert 0 < s <= e
    assert context[f["offsets"][s, 0]:f["offsets"][e, 1]] == r["answer_text"]
    assert f["token_type_ids"][s] == 1
  # The answer truncated away: the target is [CLS].
  short = tsv.qa_features(rows[:1], tok, max_length=12)[0]
  assert len(short["input_ids"]) == 12 and short["start_positions"] == short["end_positions"] == 0
  path = tmp_path / "qa.jsonl"
  good = json.dumps(dict(question="q", context=context, answer_text="london", answer_start=26))
  bad = json.dumps(dict(question="q", context=context, answer_text="london", answer_start=3))
  path.write_text(good + "\n" + bad + "\n")
  with pytest.raises(DataError, match=r"qa.jsonl:2: malformed row: answer_text 'london' is not at answer_start=3"):
    tsv.read_qa(path)
  path.write_text(good + "\n\n{not json\n")
  with pytest.raises(DataError, match=r"qa.jsonl:3: malformed row: not JSON"):
    tsv.read_qa(path)


def test_task_batches_cover_each_epoch_and_bucket_lengths():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 33, 50)  # features are at most max_length long
  examples = [dict(input_ids=np.arange(2, 2 + n, dtype=np.int32), token_type_ids=np.zeros(n, np.int32),
                   labels=np.int32(i)) for i, n in enumerate(lengths)]
  ds = tsv.task_batches(examples, batch_size=10, seed=0, pad_id=0, max_length=32, pad_multiple=16)
  seen = np.concatenate([ds[i]["labels"] for i in range(5)])
  assert sorted(seen) == list(range(50))  # one epoch = every example once
  assert not np.array_equal(np.concatenate([ds[i]["labels"] for i in range(5, 10)]), seen)
  for i in range(10):
    b = ds[i]
    assert b["input_ids"].shape[1] in (16, 32)
    longest = max(len(examples[j]["input_ids"]) for j in b["labels"])
    assert b["input_ids"].shape[1] == min(32, -(-longest // 16) * 16)
    assert np.array_equal(b["attention_mask"].sum(1), lengths[b["labels"]])


def test_task_batches_grouped_by_length():
  rng = np.random.default_rng(7)
  lengths = rng.integers(3, 64, 203)  # 203 rows, batches of 8: 25 per epoch, 3 rows left over
  examples = [dict(input_ids=np.arange(2, 2 + n, dtype=np.int32), token_type_ids=np.zeros(n, np.int32),
                   labels=np.int32(i)) for i, n in enumerate(lengths)]
  common = dict(batch_size=8, seed=3, pad_id=0, max_length=64, pad_multiple=16)
  grouped = tsv.task_batches(examples, group_by_length=10, **common)
  epoch = [grouped[i]["labels"] for i in range(25)]
  seen = np.concatenate(epoch)
  assert len(set(seen)) == 200  # every row at most once per epoch
  nxt = np.concatenate([grouped[i]["labels"] for i in range(25, 50)])
  assert len(set(nxt)) == 200 and set(seen) != set(nxt)  # a new permutation: other rows left over
  # Less padding than random batches, and rows within a chunk of 10 batches are sorted by length
  # (the batches themselves are served in a shuffled order).
  plain = tsv.task_batches(examples, **common)
  padded = lambda ds: sum(ds[i]["input_ids"].size for i in range(25))
  assert padded(grouped) < 0.8 * padded(plain)
  chunk = sorted(epoch[:10], key=lambda b: lengths[b].min())
  spans = [(lengths[b].min(), lengths[b].max()) for b in chunk]
  assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))
  for i in range(3):
    b = grouped[i]
    assert np.array_equal(b["attention_mask"].sum(1), lengths[b["labels"]])
    assert b["input_ids"].shape[1] == min(64, -(-lengths[b["labels"]].max() // 16) * 16)
  shard = tsv.task_batches(examples, group_by_length=10, process_index=1, process_count=2, **common)
  assert np.array_equal(shard[4]["labels"], grouped[4]["labels"][4:])
  with pytest.raises(ValueError, match="5 examples cannot fill one batch of 8 rows"):
    tsv.task_batches(examples[:5], group_by_length=10, **common)
