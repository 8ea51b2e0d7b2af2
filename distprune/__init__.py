"""distprune: fast, exact, distributed unstructured pruning of causal language models."""

from distprune.api import PruneResult, prune
from distprune.config import PruneConfig

__all__ = ["PruneConfig", "PruneResult", "prune"]
