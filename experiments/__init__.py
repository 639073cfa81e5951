"""Experiment entry points (`python -m experiments.NAME`, run from the repo root) and their configs.
Each one parses flags and calls the library; see README.md, "Architecture"."""
