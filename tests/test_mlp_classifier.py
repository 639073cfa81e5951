"""The seed example family (llmx/families/mlp): every activation under every optimizer reaches
0.93 held-out accuracy; the entry point logs, prints and resumes; bad configs fail as one line."""
import itertools
import json

import pytest

from llmx.families.mlp.recipe import RECIPE
from llmx.train import run
from llmx.train.config_check import ConfigError
from tests.conftest import cli, load_config

ENTRY = ("experiments.mlp_classifier", "--config=experiments/configs/mlp.py")


@pytest.mark.parametrize("optimizer,activation",
                         list(itertools.product(("sgd", "adam", "rmsprop"), ("relu", "sigmoid", "tanh"))))
def test_every_activation_under_every_optimizer_classifies(optimizer, activation, tmp_path, capsys):
  c = load_config("mlp.py")
  c.train.update(optimizer=optimizer, eval_every=0, checkpoint_every=0, log_every=c.train.steps)
  c.model.activation = activation
  result = run.train(RECIPE, c, str(tmp_path))
  assert result.step == c.train.steps
  assert result.final["heldout_accuracy"] >= 0.93, result.final
  assert result.history[-1]["val_accuracy"] == pytest.approx(result.final["heldout_accuracy"])
  assert "held-out accuracy" in capsys.readouterr().out


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_entry_point_logs_prints_and_resumes(tmp_path):
  proc = cli(*ENTRY, f"--workdir={tmp_path}", "--config.train.steps=100")
  rows = _metrics(tmp_path)
  assert [r["step"] for r in rows if "val_accuracy" in r] == [100]
  assert f"held-out accuracy {rows[-1]['val_accuracy']:.4f} (114 tumours)" in proc.stdout

  # The same command with more steps continues from the checkpoint at step 100.
  proc = cli(*ENTRY, f"--workdir={tmp_path}", "--config.train.steps=200",
             "--config.train.lr_decay_steps=100")
  assert "resumed from" in proc.stdout and "at step 100" in proc.stdout
  rows = _metrics(tmp_path)
  steps = [r["step"] for r in rows]
  assert steps == [50, 100, 150, 200]  # one line per logged step, continued
  accuracy = rows[-1]["val_accuracy"]
  assert accuracy >= 0.93
  assert f"held-out accuracy {accuracy:.4f} (114 tumours)" in proc.stdout
  assert "after 200 steps" in proc.stdout


def test_bad_config_value_exits_2_with_one_line(tmp_path):
  proc = cli(*ENTRY, f"--workdir={tmp_path}", "--config.model.activation=swish", check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: model.activation='swish': must be one of 'relu', 'sigmoid', 'tanh'"]


@pytest.mark.parametrize("field,value,message", [
    ("train.optimizer", "lion", "train.optimizer='lion': must be one of 'sgd', 'adam'"),
    ("train.learning_rate", -0.1, "train.learning_rate=-0.1: must lie in (0.0, inf)"),
    ("train.momentum", 1.0, "train.momentum=1.0: must lie in [0.0, 1.0)"),
    ("model.hidden", 0, "model.hidden=0: must be an integer > 0"),
    ("data.test_fraction", 1.0, "data.test_fraction=1.0: must lie in (0.0, 1.0)"),
    ("data.path", "x.csv", "data.path='x.csv': this family reads scikit-learn's bundled"),
    ("train.batch_size", 1000, "train.batch_size=1000 is more than the 455 training rows"),
])
def test_bad_values_name_the_field(field, value, message, tmp_path):
  c = load_config("mlp.py")
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError) as e:
    run.train(RECIPE, c, str(tmp_path))
  assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
