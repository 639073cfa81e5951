"""The LM experiment from the command line, as a user runs it."""
import json

import pytest

from llmx.families.lm import recipe as lm_recipe
from llmx.train.config_check import ConfigError
from tests.conftest import cli, load_config


def test_pretrain_resume_and_generate(tmp_path, data_dir):
  work = str(tmp_path / "run")
  common = ["experiments.pretrain_lm", "--config=experiments/configs/lm.py:smoke", f"--workdir={work}",
            f"--config.data.path={data_dir / 'tinyshakespeare.txt'}"]
  first = cli(*common)
  assert "--- sample after step 20 ---" in first.stdout
  second = cli(*common, "--config.train.steps=30", "--config.train.lr_decay_steps=20")
  assert "resumed" in second.stdout and "step 30" in second.stdout
  steps = [json.loads(l)["step"] for l in open(f"{work}/metrics.jsonl")]
  assert steps == [5, 10, 15, 20, 25, 30]
  gen = ["experiments.generate", f"--workdir={work}", "--prompt=ROMEO:", "--max_new_tokens=30", "--seed=3"]
  a, b = cli(*gen).stdout, cli(*gen).stdout
  assert a == b and a.startswith("ROMEO:") and len(a.rstrip("\n")) == 36
  bad = cli("experiments.generate", f"--workdir={work}", "--prompt=ROMEO\u00e9", check=False)
  assert bad.returncode == 2 and "'\u00e9'" in bad.stderr and "Traceback" not in bad.stderr


def test_config_errors_are_one_line_and_name_the_field(tmp_path):
  bad = cli("experiments.pretrain_lm", "--config=experiments/configs/lm.py:smoke", f"--workdir={tmp_path}",
            "--config.model.d_model=31", check=False)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "model.d_model=31 is not divisible by model.n_head=2" in bad.stderr


@pytest.mark.parametrize("overrides, message", [
    (dict(model=dict(d_model=130, n_head=4)), r"model.d_model=130 is not divisible by model.n_head=4"),
    (dict(model=dict(n_layer=0)), r"model.n_layer=0: must be an integer > 0"),
    (dict(train=dict(steps=-5)), r"train.steps=-5: must be an integer > 0"),
    (dict(train=dict(batch_size=0)), r"train.batch_size=0"),
    (dict(model=dict(dropout=1.5)), r"model.dropout=1.5: must lie in \[0.0, 1.0\)"),
    (dict(model=dict(attention_impl="flash")), r"model.attention_impl='flash'"),
])
def test_config_validation(overrides, message):
  c = load_config("lm.py:smoke")
  for section, values in overrides.items():
    c[section].update(values)
  with pytest.raises(ConfigError, match=message):
    lm_recipe.validate(c)


def test_block_size_longer_than_a_split(tmp_path):
  path = tmp_path / "small.txt"
  path.write_text("to be or not to be, that is the question\n" * 5)
  c = load_config("lm.py:smoke")
  c.data.path = str(path)
  with pytest.raises(ConfigError, match=r"model.block_size=32 is longer than the validation split \(21 tokens"):
    lm_recipe.load_tokens(c)


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown variant 'tiny'"):
    load_config("lm.py:tiny")
