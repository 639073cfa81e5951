"""Hugging Face checkpoint folders: config.json plus either model.safetensors or shards listed in
model.safetensors.index.json ({"metadata": {...}, "weight_map": {tensor name: shard file}}).

Only safetensors are read: pickled (.bin, .pt) checkpoints can run code when loaded.
"""
import json
import pathlib
import posixpath

import numpy as np

from llmx.formats import CheckpointFormatError
from llmx.formats import safetensors

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_UNREAD = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def folder_of(path, what: str = "a Hugging Face folder") -> pathlib.Path:
  """`path` as a Path, or an error saying it is not a folder. what: named in the error."""
  folder = pathlib.Path(path).expanduser()
  if not folder.is_dir():
    raise CheckpointFormatError(f"{path}: no such folder (expected {what} with {CONFIG} and {SINGLE})")
  return folder


def read_config(folder) -> dict:
  """folder/config.json as a dict."""
  file = pathlib.Path(folder) / CONFIG
  if not file.is_file():
    raise CheckpointFormatError(f"{folder} is not a Hugging Face checkpoint: no {CONFIG}")
  try:
    config = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointFormatError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise CheckpointFormatError(f"{file}: not a JSON object")
  return config


def _shard_path(folder: pathlib.Path, index: pathlib.Path, name) -> pathlib.Path:
  # An index is data from the internet: a shard named "../x" or "/etc/x" must not make us read
  # outside the folder. Checked on the name, not the resolved path, because a Hugging Face cache
  # folder links every file to a blob outside it.
  ok = (isinstance(name, str) and not posixpath.isabs(name) and "\\" not in name and ":" not in name
        and all(part not in ("", ".", "..") for part in name.split("/")))
  if not ok:
    raise CheckpointFormatError(f"{index}: shard {name!r} is not a file name inside {folder}")
  return folder / name


def weight_files(folder) -> list[pathlib.Path]:
  """The safetensors files of a checkpoint folder: the shards its index names, or model.safetensors."""
  folder = pathlib.Path(folder)
  index = folder / INDEX
  if index.is_file():
    weight_map = _weight_map(folder)
    files = [_shard_path(folder, index, name) for name in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
      raise CheckpointFormatError(f"{index}: shards {', '.join(absent)} are not in {folder}")
    return files
  if (folder / SINGLE).is_file():
    return [folder / SINGLE]
  present = sorted(p.name for p in folder.iterdir())
  unread = [n for n in present if n.endswith(_UNREAD)]
  hint = (f"; {', '.join(unread)} are pickle/TF formats, which llmx does not read: convert them "
          f"to safetensors") if unread else ""
  raise CheckpointFormatError(f"{folder}: no {SINGLE} (files: {', '.join(present)}){hint}")


def _weight_map(folder: pathlib.Path) -> dict[str, str]:
  index = folder / INDEX
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise CheckpointFormatError(f"{index}: not an index with a weight_map ({e!r})") from None
  if not isinstance(weight_map, dict):
    raise CheckpointFormatError(f"{index}: weight_map is not a JSON object")
  return weight_map


def read_headers(folder) -> dict[str, safetensors.TensorInfo]:
  """Every tensor of a checkpoint folder, by name, from the file headers alone (no data read):
  what an importer checks names and shapes against before loading anything."""
  folder = pathlib.Path(folder)
  infos = {}
  for file in weight_files(folder):
    shard, _ = safetensors.read_header(file)
    twice = sorted(set(shard) & set(infos))
    if twice:
      raise CheckpointFormatError(
          f"{file}: tensors also in {infos[twice[0]].file.name}: {', '.join(twice)}")
    infos.update(shard)
  if (folder / INDEX).is_file():
    # The index and the shards must agree, or a tensor would be read from where the index does not say.
    weight_map = _weight_map(folder)
    wrong = sorted(n for n, f in weight_map.items() if n not in infos or infos[n].file != folder / f)
    unlisted = sorted(set(infos) - set(weight_map))
    if wrong or unlisted:
      raise CheckpointFormatError(
          f"{folder / INDEX} disagrees with its shards: not in the named shard: {wrong[:5]}; "
          f"in a shard but not in the index: {unlisted[:5]}")
  return infos


def write_checkpoint(folder, tensors: dict[str, np.ndarray], config: dict, *,
                     max_shard_bytes: int | None = None) -> pathlib.Path:
  """Writes config.json and the tensors as model.safetensors, or, when they exceed
  max_shard_bytes, as model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json
  (as transformers' save_pretrained does) -> the folder."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  metadata = {"format": "pt"}  # transformers reads files without it as TensorFlow/Flax weights
  total = sum(np.asarray(x).nbytes for x in tensors.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    safetensors.write_file(folder / SINGLE, tensors, metadata)
    (folder / INDEX).unlink(missing_ok=True)  # a stale index would be read instead
    return folder
  shards, size = [{}], 0
  for name, x in tensors.items():
    nbytes = np.asarray(x).nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name], size = x, size + nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.write_file(folder / name, shard, metadata)
    weight_map.update(dict.fromkeys(shard, name))
  (folder / INDEX).write_text(json.dumps(dict(metadata=dict(total_size=total), weight_map=weight_map),
                                         indent=2) + "\n")
  (folder / SINGLE).unlink(missing_ok=True)
  return folder
