"""BERT experiments as a user runs them: pretraining with resume, fine-tuning on each task."""
import json

import numpy as np
import pytest

from llmx.families.bert import finetune, pretrain
from llmx.train import run
from llmx.data.wordpiece import WordPieceTokenizer
from llmx.families.bert import hf as bert_hf
from llmx.families.bert.model import BertConfig, BertModel
from llmx.train.config_check import ConfigError
from tests.conftest import cli, load_config

WORDS = ("alpha beta gamma delta kappa sigma omega river stone cloud light shadow north south "
         "east west quick slow bright dark").split()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("corpus") / "lines.txt"
  path.write_text("\n".join(" ".join(rng.choice(WORDS, rng.integers(3, 9))) for _ in range(300)) + "\n")
  return path


def test_pretrain_resume_then_finetune_from_it(tmp_path, corpus_file):
  work = tmp_path / "pre"
  common = ["experiments.pretrain_bert", "--config=experiments/configs/bert.py:smoke",
            f"--workdir={work}", f"--config.data.path={corpus_file}", "--config.data.vocab_size=120"]
  first = cli(*common, "--config.train.steps=10")
  assert "step 10: val_mlm_accuracy" in first.stdout and "unigram baseline" in first.stdout
  second = cli(*common, "--config.train.steps=15", "--config.train.lr_decay_steps=10")
  assert "resumed" in second.stdout and "step 15" in second.stdout
  lines = [json.loads(l) for l in open(work / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [5, 10, 15]
  assert {"val_mlm_accuracy", "val_nsp_accuracy", "unigram_baseline"} <= set(lines[1])
  assert (work / "hf" / "model.safetensors").is_file() and (work / "hf" / "tokenizer.json").is_file()

  # Fine-tune from the llmx checkpoint (in-process) on a generated classification task:
  # label = whether "light" occurs.
  rng = np.random.default_rng(1)
  for name, n in (("train", 64), ("dev", 24)):
    rows = [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]
    (tmp_path / f"{name}.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{r}\t{int('light' in r.split())}\n" for r in rows))
  c = load_config("finetune.py:sst2")
  c.init_from = str(work)
  c.data.update(train_path=str(tmp_path / "train.tsv"), dev_path=str(tmp_path / "dev.tsv"), max_length=32)
  c.train.update(steps=6, batch_size=8, eval_every=3, checkpoint_every=6, log_every=3, warmup_steps=1)
  metrics = run.train(finetune.FINETUNE, c, str(tmp_path / "ft")).final
  assert metrics["step"] == 6 and metrics["dev_examples"] == 24 and 0 <= metrics["val_accuracy"] <= 1
  assert json.loads((tmp_path / "ft" / "dev_metrics.json").read_text())["val_accuracy"] == metrics["val_accuracy"]
  # The Hugging Face export of the pretraining run is a valid init_from too.
  assert finetune.resolve_init_from(str(work / "hf")) == ("hf", work / "hf")


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory):
  """A small random BERT saved as a Hugging Face folder, with a tokenizer trained on WORDS."""
  from flax import nnx
  folder = tmp_path_factory.mktemp("hf")
  rng = np.random.default_rng(0)
  tok = WordPieceTokenizer.train([" ".join(rng.choice(WORDS, 8)) for _ in range(200)], vocab_size=80)
  config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
  bert_hf.save_pretrained(BertModel(config, rngs=nnx.Rngs(0)), folder)
  tok.save(folder)
  return folder


def _finetune(tmp_path, folder, task, train_rows, dev_rows, writer, **train):
  for name, rows in (("train", train_rows), ("dev", dev_rows)):
    (tmp_path / name).write_text(writer(rows))
  c = load_config(f"finetune.py:{task}")
  c.init_from = str(folder)
  c.model.dropout = 0.0
  c.data.update(train_path=str(tmp_path / "train"), dev_path=str(tmp_path / "dev"), max_length=32)
  c.train.update(batch_size=16, warmup_steps=5, eval_every=0, checkpoint_every=0, log_every=10,
                 **train)
  return run.train(finetune.FINETUNE, c, str(tmp_path / "run")).final


def test_token_classification_learns_generated_tags(tmp_path, tiny_hf_folder):
  # Tag: DIR for compass words, O otherwise; learnable from the word alone.
  rng = np.random.default_rng(2)
  compass = {"north", "south", "east", "west"}
  make = lambda n: [list(rng.choice(WORDS, rng.integers(3, 9))) for _ in range(n)]
  writer = lambda rows: "tokens\ttags\n" + "".join(
      " ".join(r) + "\t" + " ".join("DIR" if w in compass else "O" for w in r) + "\n" for r in rows)
  dev = make(40)
  metrics = _finetune(tmp_path, tiny_hf_folder, "tagging", make(400), dev, writer, steps=60,
                      learning_rate=3e-3)
  majority = 1 - np.mean([w in compass for r in dev for w in r])
  assert metrics["val_accuracy"] > max(0.95, majority + 0.1), (metrics, majority)


def test_span_qa_learns_generated_questions(tmp_path, tiny_hf_folder):
  # "which way": the answer is the one compass word among the context's words.
  rng = np.random.default_rng(3)
  compass = ["north", "south", "east", "west"]
  others = [w for w in WORDS if w not in compass]

  def make(n):
    rows = []
    for _ in range(n):
      words = list(rng.choice(others, rng.integers(4, 12)))
      at = int(rng.integers(0, len(words) + 1))
      answer = str(rng.choice(compass))
      context = " ".join(words[:at] + [answer] + words[at:])
      start = len(" ".join(words[:at])) + (1 if at else 0)
      rows.append(dict(question="which way", context=context, answer_text=answer, answer_start=start))
    return rows

  writer = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)
  metrics = _finetune(tmp_path, tiny_hf_folder, "qa", make(300), make(40), writer, steps=60,
                      learning_rate=3e-3)
  # Chance: about 1 in 8 context words; the head must find the answer far more often.
  assert metrics["val_exact_match"] > 0.8 and metrics["val_f1"] >= metrics["val_exact_match"], metrics


def test_finetune_errors_are_one_line(tmp_path):
  bad = cli("experiments.finetune_bert", "--config=experiments/configs/finetune.py:sst2",
            f"--workdir={tmp_path}", f"--config.init_from={tmp_path}", check=False)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert f"{tmp_path} is not a Hugging Face checkpoint: no config.json" in bad.stderr


def test_config_validation(tmp_path):
  c = load_config("bert.py:smoke")
  c.data.max_len = 64
  with pytest.raises(ConfigError, match=r"data.max_len=64 exceeds model.max_position_embeddings=32"):
    pretrain.validate_pretrain(c)
  c = load_config("bert.py:smoke")
  c.model.hidden_size = 33
  with pytest.raises(ConfigError, match=r"model.hidden_size=33 is not divisible by model.num_heads=2"):
    pretrain.validate_pretrain(c)
  c = load_config("finetune.py:sst2")
  c.task = "ner"
  with pytest.raises(ConfigError, match=r"task='ner': must be one of 'classification', 'tagging', 'qa'"):
    finetune.validate_finetune(c)
  c = load_config("finetune.py:sst2")
  c.data.group_by_length = -1
  with pytest.raises(ConfigError, match=r"data.group_by_length=-1: must be an integer >= 0"):
    finetune.validate_finetune(c)
  c = load_config("finetune.py:tagging")
  with pytest.raises(ConfigError, match=r"data.train_path is empty"):
    finetune.validate_finetune(c)
  with pytest.raises(ConfigError, match=r"init_from='no_such_package_xyz': not a folder"):
    finetune.resolve_init_from("no_such_package_xyz")
  with pytest.raises(ConfigError, match=r"UNSET_LLMX_VAR"):
    pretrain.expand_path("$UNSET_LLMX_VAR/train.tsv", "data.train_path")
  with pytest.raises(ValueError, match="unknown variant 'mnli'"):
    load_config("finetune.py:mnli")
