"""Decoding for every decoder: one cache protocol; sampling, greedy and beam search.

  protocol.py  what a model implements (init_cache, decode_step, reorder_cache, ...) and the
               steppers the loops drive it through (cached, or uncached as the reference)
  sampling.py  logits processors and the sampling / greedy loop
  beam.py      the beam-search loop
  prompts.py   prompts and sources -> padded batches; DecodingError
  decode.py    the entry points: decode, generate, decode_sources
  cli.py       the decoding flags of the entry points (defined when called, never on import)
  bench.py     cached against uncached decoding: speed and agreement
"""
from llmx.inference.decode import Decoded, check_options, decode, decode_sources, generate
from llmx.inference.prompts import DecodingError

__all__ = ["Decoded", "DecodingError", "check_options", "decode", "decode_sources", "generate"]
