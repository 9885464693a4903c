"""Prompt lookup: which tokens it drafts."""

from tokenforge.spec.ngram import ngram_propose, ngram_tree


def test_drafts_what_followed_the_latest_match_of_the_longest_suffix():
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # suffix [2, 3] last occurred at index 6 (followed by 7, 8, 5); the longer [5, 2, 3] never did
    assert ngram_propose(tokens, 3, 1, 3) == [7, 8, 5]
    assert ngram_propose(tokens, 10, 1, 3) == [7, 8, 5, 2, 3]  # runs up to the end of the text


def test_longer_matches_win_over_more_recent_shorter_ones():
    tokens = [4, 5, 6, 10, 11, 6, 20, 4, 5, 6]
    assert ngram_propose(tokens, 2, 1, 3) == [10, 11]  # [4, 5, 6] matched, not just the latest [6]
    assert ngram_propose(tokens, 2, 1, 1) == [20, 4]


def test_no_match_or_too_short_gives_no_draft():
    assert ngram_propose([1, 2, 3, 4], 3, 1, 3) == []
    assert ngram_propose([7], 3, 1, 3) == []
    assert ngram_propose([1, 2, 1, 2], 3, 3, 3) == []  # n_min too long to match


def _paths(draft, parents):
    paths = {}
    for j, (t, p) in enumerate(zip(draft, parents, strict=True)):
        assert p < j  # parents come first
        paths[j] = (paths[p] if p >= 0 else ()) + (t,)
    return set(paths.values())


def test_tree_merges_the_continuations_of_every_match():
    # [1, 2] is followed by 3 4 ..., by 3 5 ... and, most recently, by 6 0 1 ...: the two 3-branches
    # together weigh as much as the latest match (counted double), so both roots are kept
    tokens = [1, 2, 3, 4, 0, 1, 2, 3, 5, 0, 1, 2, 6, 0, 1, 2]
    draft, parents = ngram_tree(tokens, 4, 1, 2, width=3)
    assert _paths(draft, parents) == {(3,), (6,), (6, 0), (6, 0, 1)}
    draft, parents = ngram_tree(tokens, 6, 1, 2, width=3)
    assert {(3, 4), (3, 5)} & _paths(draft, parents)
    # width 1: a chain along the best guess, the latest match
    draft, parents = ngram_tree(tokens, 3, 1, 2, width=1)
    assert (draft, parents) == ([6, 0, 1], [-1, 0, 1])


def test_tree_respects_budget_and_width():
    tokens = [1, 2, 3, 0, 1, 2, 4, 0, 1, 2, 5, 0, 1, 2, 6, 0, 1, 2]
    draft, parents = ngram_tree(tokens, 8, 1, 2, width=2)
    assert len(draft) <= 8
    assert sum(1 for p in parents if p == -1) <= 2
    assert ngram_tree([1, 2, 3], 4, 1, 2, width=2) == ([], [])


def test_byte_level_matches_off_token_boundaries_do_not_count():
    # the bytes of [256, 0] contain those of [1] one byte in: not a token match
    assert ngram_propose([256, 0, 7, 1], 2, 1, 1) == []
    assert ngram_propose([256, 0, 1, 9, 1], 2, 1, 1) == [9, 1]
