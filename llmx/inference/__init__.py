"""Decoding for every decoder: one cache protocol; sampling, greedy and beam search."""
