"""Moving per-token values between two tokenizations of the same text.

An oracle (or reference) with another tokenizer scores the response in its own tokens; the policy
needs one value per *policy* token. Both tokenizers give character offsets into the same response
text, and the values move through the characters:

1. Tokens are grouped by start offset (byte-level tokenizers give every piece of a split character
   the same offsets). A group owns the characters from its start up to the next group's start; the
   first group also owns any characters before it, the last one everything to the end. So each
   tokenization partitions the text exactly, whatever it does with whitespace.
2. A source group's value (the sum over its tokens) is spread evenly over the non-whitespace
   characters it owns (over all of them if it owns only whitespace): tokenizers disagree about
   which token a space belongs to, and a token's value is about its content, not the space before
   it. A zero-width group at the very end (an end-of-text token) joins the group before it.
3. A target group receives the sum over the characters it owns, shared equally by its tokens.

So a target token that straddles two source tokens gets the share of each that it overlaps, and
the total is conserved: the target values sum to the source values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _owned_ranges(offsets: Sequence[tuple[int, int]], text_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token its group; per group the characters `[start, stop)` it owns (groups in text order)."""
    starts = np.asarray([start for start, _ in offsets], dtype=np.int64)
    if np.any(np.diff(starts) < 0) or np.any(starts < 0) or np.any(starts > text_length):
        raise ValueError(f"Token offsets must be in text order and inside the text (length {text_length}).")
    group_starts, group_of_token = np.unique(starts, return_inverse=True)
    owned_start = group_starts.copy()
    owned_start[0] = 0
    owned_stop = np.append(group_starts[1:], text_length)
    return group_of_token, owned_start, owned_stop


def map_token_values(
    source_offsets: Sequence[tuple[int, int]],
    source_values: Sequence[float],
    target_offsets: Sequence[tuple[int, int]],
    text: str,
) -> np.ndarray:
    """Values of the source tokens, re-expressed on the target tokens of the same text.

    Args:
        source_offsets: `(start, end)` character offsets of each source token, in text order.
        source_values: One value per source token (e.g. an oracle token reward).
        target_offsets: `(start, end)` character offsets of each target (policy) token.
        text: The text both offsets index into.

    Returns:
        float64 array with one value per target token; it sums to `sum(source_values)`.
    """
    text_length = len(text)
    source_values = np.asarray(source_values, dtype=np.float64)
    if len(source_values) != len(source_offsets):
        raise ValueError(f"{len(source_values)} values for {len(source_offsets)} source tokens.")
    if len(target_offsets) == 0:
        if np.any(source_values != 0):
            raise ValueError("Source values cannot be placed: the target tokenization is empty.")
        return np.zeros(0)
    target_group, target_start, target_stop = _owned_ranges(target_offsets, text_length)
    tokens_per_group = np.bincount(target_group, minlength=len(target_start))
    if len(source_offsets) == 0:
        return np.zeros(len(target_offsets))
    if text_length == 0:  # no characters to go through: the first target group takes everything
        owned = np.zeros(len(target_start))
        owned[0] = source_values.sum()
        return owned[target_group] / tokens_per_group[target_group]

    group, start, stop = _owned_ranges(source_offsets, text_length)
    group_value = np.bincount(group, weights=source_values, minlength=len(start))
    # A group owning no characters (a zero-width token at the very end) folds into the one before.
    for g in np.flatnonzero(stop <= start)[::-1]:
        previous = np.flatnonzero(stop[:g] > start[:g])
        group_value[previous[-1]] += group_value[g]
        group_value[g] = 0.0
    # Non-empty groups partition [0, text_length) in order: label every character with its group.
    char_group = np.repeat(np.arange(len(start)), np.maximum(stop - start, 0))
    weight = np.fromiter((not c.isspace() for c in text), dtype=np.float64, count=text_length)
    content = np.bincount(char_group, weights=weight, minlength=len(start))
    weight[content[char_group] == 0] = 1.0  # a group of only whitespace spreads over its whitespace
    per_char = weight * (group_value / np.maximum(np.bincount(char_group, weights=weight, minlength=len(start)), 1e-300))[char_group]
    cumulative = np.concatenate([[0.0], np.cumsum(per_char)])  # cumulative[c]: value of characters [0, c)
    owned = cumulative[target_stop] - cumulative[target_start]
    return owned[target_group] / tokens_per_group[target_group]
