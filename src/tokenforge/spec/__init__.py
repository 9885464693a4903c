"""Speculative decoding: the scheduler's drafting policy, and the runner's proposers whose drafts it verifies."""

from tokenforge.spec.decoder import SpecDecoder
from tokenforge.spec.ngram import NgramProposer, ngram_propose
from tokenforge.spec.proposer import DraftRequest, Proposer

__all__ = ["DraftRequest", "NgramProposer", "Proposer", "SpecDecoder", "ngram_propose"]
