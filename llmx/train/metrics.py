"""Metrics: `metrics.jsonl` (one object per line with `step`) and TensorBoard event files."""
import json
import pathlib

import jax


class MetricsWriter:
  """Writes on process 0 only; on resume, drops logged lines past the restored step so the
  curve has no duplicate or orphaned steps."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= resume_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    from tensorboardX import SummaryWriter  # imported here: only process 0 writes events
    self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    with self.path.open("a") as f:
      f.write(json.dumps({"step": int(step), **values}) + "\n")
    for name, value in values.items():
      self._tb.add_scalar(name, value, int(step))

  def close(self):
    if self._tb is not None:
      self._tb.close()
