"""Prompt lookup (scheduler/ngram.py): the longest suffix n-gram's latest earlier match."""

from __future__ import annotations

from pagedserve.scheduler.ngram import propose


def test_the_tokens_after_the_latest_earlier_match_are_proposed():
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    # "1 2 3" occurs at 0 and 5 before the suffix: the latest (5) is followed by 7 8 5.
    assert propose(tokens, k=3, min_n=1, max_n=3) == [7, 8, 5]
    assert propose(tokens, k=2, min_n=1, max_n=3) == [7, 8]


def test_the_longest_pattern_wins_over_a_later_shorter_one():
    tokens = [4, 5, 6, 10, 11, 0, 6, 12, 4, 5, 6]
    # "4 5 6" matches at 0 (followed by 10); "6" alone matches later, at 6 (followed by 12).
    assert propose(tokens, k=1, min_n=1, max_n=3) == [10]
    assert propose(tokens, k=1, min_n=1, max_n=1) == [12]


def test_no_match_no_proposal_and_the_suffix_never_matches_itself():
    assert propose([1, 2, 3, 4], k=3, min_n=1, max_n=2) == []
    assert propose([7], k=3, min_n=1, max_n=2) == []
    assert propose([], k=3, min_n=1, max_n=2) == []
    assert propose([1, 2, 3, 1, 2], k=3, min_n=3, max_n=3) == []  # below min_n only


def test_proposals_stop_at_the_end_of_the_sequence():
    # "a a a a": the latest earlier "a a" starts one before the suffix: one token follows.
    assert propose([5, 5, 5, 5], k=4, min_n=2, max_n=2) == [5]
    assert propose([3, 1, 2, 3], k=4, min_n=1, max_n=1) == [1, 2, 3]
