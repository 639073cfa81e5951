"""Checkpoint and file formats shared by every family: Hugging Face safetensors and configs, GGUF, chat templates.

`safetensors`: the file format (headers, tensors, writing). `hf`: Hugging Face folders (config.json,
one or several safetensors shards). `name_map`: tables from checkpoint tensor names to model
variables, with per-entry transforms, that each family's importer fills in.
"""
from llmx.errors import LlmxError


class CheckpointFormatError(LlmxError, ValueError):
  """A checkpoint file or folder llmx cannot read; the message names the file and what is wrong."""
