"""Driving a grammar matcher without a model: at each step draw a token uniformly among those the mask
allows, until the grammar ends. If the mask ever allowed a token the grammar rejects, `accept_tokens`
would fail; if it allowed an invalid output, the caller's validation would.

Unbounded constructs (an integer, a string without maxLength) can go on for long under uniform draws, so
after `soft_limit` tokens the walk still draws only from the mask but narrows the draw: EOS if allowed;
else one of these kinds picked at random among those allowed: a token closing a string (a quote, maybe
followed by `}` and `]`), other closing tokens, a comma, one punctuation character (an email's `@` and `.`);
else any one-character token. Picking the kind at random keeps arrays (comma or `]`) and emails (`}` is a
valid character there, `@` must come) from looping.
"""

from __future__ import annotations

import random

import torch

from tokenforge.structured.logits import unpack_bitmask
from tokenforge.structured.matcher import GrammarMatcher

CLOSERS = set('"}]')


class Walker:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        self.vocab_size = vocab_size
        self.eos = sorted(eos_token_ids)
        texts = [tokenizer.decode([t], skip_special_tokens=False) for t in range(vocab_size)]
        self.closing = torch.tensor([bool(t) and set(t) <= CLOSERS for t in texts])
        self.closing_string = self.closing & torch.tensor([t.startswith('"') for t in texts])
        self.comma = torch.tensor([t == "," for t in texts])
        self.single = torch.tensor([len(t) == 1 for t in texts])
        self.punctuation = self.single & torch.tensor([not t.isalnum() and not t.isspace() for t in texts])

    def allowed(self, matcher: GrammarMatcher) -> torch.Tensor:
        bitmask = torch.zeros(1, (self.vocab_size + 31) // 32, dtype=torch.int32)
        matcher.fill_bitmask(bitmask, 0)
        return unpack_bitmask(bitmask, self.vocab_size)[0]

    def walk(self, matcher: GrammarMatcher, rng: random.Random, max_tokens: int = 600,
             soft_limit: int = 60) -> tuple[list[int], bool]:
        """The output's token ids (EOS excluded) and whether the grammar ended (False: max_tokens ran out)."""
        out: list[int] = []
        for step in range(max_tokens):
            allowed = self.allowed(matcher)
            assert allowed.any(), "the mask allows no token at all"
            if step >= soft_limit:
                allowed = self._prefer_closing(allowed, rng)
            ids = allowed.nonzero().squeeze(1).tolist()
            token = ids[rng.randrange(len(ids))]
            assert matcher.accept_tokens([token]), f"the grammar rejected token {token}, which its mask allowed"
            if token in self.eos:
                return out, True
            out.append(token)
            if matcher.is_terminated:
                return out, True
        return out, False

    def _prefer_closing(self, allowed: torch.Tensor, rng: random.Random) -> torch.Tensor:
        eos = torch.zeros_like(allowed)
        eos[self.eos] = True
        if (allowed & eos).any():
            return allowed & eos
        kinds = [allowed & kind for kind in (self.closing_string, self.closing, self.comma, self.punctuation)]
        kinds = [kind for kind in kinds if kind.any()]
        if kinds:
            return kinds[rng.randrange(len(kinds))]
        return allowed & self.single if (allowed & self.single).any() else allowed
