"""distprune: fast, exact, distributed unstructured pruning of causal language models."""

import os

# OpenMP threads that wait for work by spinning lose whole scheduler time slices to other
# processes on a shared machine: beside two busy processes on 2 cores, token-by-token
# sampling (hundreds of small parallel regions per token) ran 1.8x slower with spinning
# threads than with passive ones, and no faster on a quiet machine (docs/BENCHMARKS.md,
# scripts/bench_sample.py). The OpenMP runtime reads this once, when torch loads, so it is
# set before torch is imported; a value the user set wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from distprune.api import PruneResult, prune
from distprune.config import PruneConfig

__all__ = ["PruneConfig", "PruneResult", "prune"]
