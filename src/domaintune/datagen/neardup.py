"""MinHash LSH candidates for gen-data's ROUGE-L near-duplicate filter at scale: the implementation (and its
reasoning, parameters and measured recall) is in data/similarity.py, shared with the training data's dedup
(data/dedup.py); this module keeps gen-data's import path."""
from __future__ import annotations

from ..data.similarity import BANDS, NUM_PERM, ROWS, SEED, MinHashCandidates

__all__ = ["BANDS", "NUM_PERM", "ROWS", "SEED", "MinHashCandidates"]
