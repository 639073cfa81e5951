"""Data: corpora, tokenizers and grain pipelines. Imports nothing else from llmx."""
