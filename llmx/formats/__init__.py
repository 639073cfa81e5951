"""Checkpoint and file formats shared by every family: Hugging Face safetensors and configs, GGUF, chat templates."""
