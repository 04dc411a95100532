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


def completion_offsets(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of `ids` (special tokens kept) and each token's `(start, end)` span in it.

    Spans come from decoding growing prefixes, so they hold for any tokenizer, whatever its own
    offset conventions; a piece of a split character gets a zero-width span after it.
    """
    spans, previous = [], 0
    for i in range(len(ids)):
        length = len(tokenizer.decode(ids[: i + 1], skip_special_tokens=False))
        spans.append((previous, max(length, previous)))
        previous = max(length, previous)
    return tokenizer.decode(list(ids), skip_special_tokens=False), spans


def map_completion_values(
    source: tuple[str, Sequence[tuple[int, int]]],
    source_values: Sequence[float],
    target: tuple[str, Sequence[tuple[int, int]]],
    content: str,
) -> np.ndarray:
    """Move per-token values of one rendering of a response onto another rendering of it.

    The two renderings (e.g. two chat templates) share the message `content` but wrap it in
    different template tokens. Tokens are assigned to the segment their span starts in: before the
    content, the content, after it. Content tokens map by characters (`map_token_values`), and so
    do the segments before and after when both renderings have the same text there. Otherwise a
    template segment maps as a whole: its sum is shared equally by the target's tokens in the same
    segment (or given to the nearest target token if the target has none there).

    Args:
        source: `(text, spans)` of the source completion, as `completion_offsets` returns.
        source_values: One value per source token.
        target: `(text, spans)` of the target completion.
        content: The response's message text, which both renderings contain.

    Returns:
        float64 array, one value per target token; it sums to `sum(source_values)`.
    """
    source_values = np.asarray(source_values, dtype=np.float64)
    (source_text, source_spans), (target_text, target_spans) = source, target
    segments = []
    for name, text, spans in (("source", source_text, source_spans), ("target", target_text, target_spans)):
        begin = text.find(content)
        if begin < 0:
            raise ValueError(f"The response text is not found in the {name} rendering {text!r}.")
        end = begin + len(content)
        starts = np.asarray([start for start, _ in spans], dtype=np.int64)
        segment = np.where(starts < begin, 0, np.where(starts < end, 1, 2)) if len(spans) else np.zeros(0, int)
        # a zero-width token at the end of the content belongs after it
        segment[(segment == 1) & (starts == end)] = 2
        segments.append((segment, begin, end, spans))
    (s_seg, s_begin, s_end, _), (t_seg, t_begin, t_end, _) = segments
    if not np.any(t_seg == 1) and len(content):
        raise ValueError("The target rendering has no token inside the response text.")

    out = np.zeros(len(target_spans))
    in_content = np.flatnonzero(t_seg == 1)
    s_content = np.flatnonzero(s_seg == 1)
    clip = lambda spans, idx, begin, end: [  # noqa: E731
        (min(max(spans[i][0], begin), end) - begin, min(max(spans[i][1], begin), end) - begin) for i in idx
    ]
    if len(in_content):
        out[in_content] = map_token_values(
            clip(source_spans, s_content, s_begin, s_end), source_values[s_content],
            clip(target_spans, in_content, t_begin, t_end), content,
        )  # fmt: skip
    bounds = {0: ((0, s_begin), (0, t_begin)), 2: ((s_end, len(source_text)), (t_end, len(target_text)))}
    for seg, fallback in ((0, in_content[:1]), (2, in_content[-1:])):
        s_idx, receivers = np.flatnonzero(s_seg == seg), np.flatnonzero(t_seg == seg)
        (s_lo, s_hi), (t_lo, t_hi) = bounds[seg]
        if len(s_idx) and len(receivers) and source_text[s_lo:s_hi] == target_text[t_lo:t_hi]:
            # the same template text on both sides: map it by characters like the content
            out[receivers] += map_token_values(
                clip(source_spans, s_idx, s_lo, s_hi), source_values[s_idx],
                clip(target_spans, receivers, t_lo, t_hi), source_text[s_lo:s_hi],
            )  # fmt: skip
            continue
        receivers = receivers if len(receivers) else (fallback if len(fallback) else np.arange(len(out))[:1])
        out[receivers] += source_values[s_idx].sum() / len(receivers)
    return out


def span_token_mask(tokenizer, completion_ids: Sequence[int], content: str, *spans: tuple[int, int]) -> np.ndarray:
    """Which completion tokens overlap any of the character `spans` of the message `content`.

    Returns:
        bool array, one entry per completion token.
    """
    text, offsets = completion_offsets(tokenizer, completion_ids)
    begin = text.find(content)
    if begin < 0:
        raise ValueError(f"The response text is not found in its rendering {text!r}.")
    keep = np.zeros(len(offsets), dtype=bool)
    for lo, hi in spans:
        lo, hi = begin + lo, begin + hi
        keep |= np.array([start < hi and end > lo and end > start for start, end in offsets], dtype=bool)
    return keep
