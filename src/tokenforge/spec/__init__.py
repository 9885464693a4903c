"""Speculative decoding: proposers draft tokens for decoding requests; the model runner verifies them."""

from tokenforge.spec.decoder import Proposer, SpecDecoder
from tokenforge.spec.ngram import NgramProposer, ngram_propose

__all__ = ["NgramProposer", "Proposer", "SpecDecoder", "ngram_propose"]
