"""A two-layer MLP classifying breast tumours as benign or malignant: the seed example family
(llmx/families/mlp: the smallest recipe, read first).

Launch:
  python -m experiments.mlp_classifier --config=experiments/configs/mlp.py --workdir=/tmp/mlp
  python -m experiments.mlp_classifier --config=experiments/configs/mlp.py --workdir=/tmp/mlp_adam \
      --config.train.optimizer=adam --config.model.activation=tanh

Data: scikit-learn's bundled Wisconsin breast-cancer set (569 tumours x 30 features, nothing
downloaded); a stratified 20% held out (114 tumours, fixed by data.split_seed), features
standardised with the training rows' statistics.
Hardware: 2 CPU cores, 8-13 s wall per run on a shared machine, nearly all of it start-up and
compilation (the 400 steps take about half a second).
Expected: held-out accuracy 0.956-0.982 with every activation (relu, sigmoid, tanh) under every
optimizer (sgd, adam, rmsprop), all at the same learning rate 0.05 (train.seed=0: sgd 0.956 /
0.956 / 0.965, adam 0.956 / 0.982 / 0.974, rmsprop 0.965 / 0.982 / 0.974 for relu / sigmoid /
tanh); printed at the end and logged as val_accuracy in metrics.jsonl.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      path="",                # unused: the data set ships with scikit-learn
      test_fraction=0.2,      # held out for the accuracy
      split_seed=0,
  ))
  c.model = ml_collections.ConfigDict(dict(
      hidden=16,
      activation="relu",      # relu | sigmoid | tanh
  ))
  c.train = ml_collections.ConfigDict(dict(
      optimizer="sgd",        # sgd (plain gradient descent while momentum=0) | adam | rmsprop
      momentum=0.0,           # sgd and rmsprop
      learning_rate=0.05,
      schedule="constant",    # constant | linear | cosine | rsqrt (llmx/train/optimizers.py)
      steps=400, batch_size=32,
      eval_every=100, checkpoint_every=100, log_every=50, max_checkpoints=2, seed=0,
      keep_best_metric="",    # "val_accuracy": also keep the checkpoint where it was highest
  ))
  # Devices: data x fsdp x tensor = all devices (one size -1: the rest). fsdp > 1 shards params and
  # optimizer state (FSDP), tensor > 1 also splits the big matrices (tensor parallelism).
  # Resuming with another batch size is refused unless this is True (a deliberate change).
  c.train.allow_batch_size_change = False
  # The learning-rate schedule's length; 0: train.steps. Resuming with a larger train.steps keeps
  # the saved length only when this says so (the run is refused otherwise).
  c.train.lr_decay_steps = 0
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c
