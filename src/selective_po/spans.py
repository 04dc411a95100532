"""The `spans` selection rule: the data says which response tokens the loss uses.

A row names its tokens in one of three ways (one per dataset, both sides):

| columns | what each holds |
| --- | --- |
| `chosen_spans`, `rejected_spans` | a list of `[start, end)` character spans of the response's message text |
| `chosen_span`, `rejected_span` | one `[start, end)` span (the bundled arithmetic data's columns) |
| `chosen_token_mask`, `rejected_token_mask` | 0/1 per response token, as the trainer tokenizes the response |

Spans are turned into per-token masks once, after TRL's tokenization (`add_selection_masks`): a
token is kept when its characters overlap a span. The collator wrapper places the masks on the
shifted completion positions of each batch, after the same truncation TRL's collator applied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .alignment import span_token_mask

SPAN_LIST_COLUMNS = ("chosen_spans", "rejected_spans")
SPAN_COLUMNS = ("chosen_span", "rejected_span")
TOKEN_MASK_COLUMNS = ("chosen_token_mask", "rejected_token_mask")
MASK_COLUMNS = ("chosen_selection_mask", "rejected_selection_mask")  # what the trainer stores, one 0/1 per response token
BATCH_KEY = "selection_given"


def span_source(column_names) -> tuple[str, str]:
    """The pair of columns a dataset names its tokens with; an error that lists the choices otherwise."""
    found = [pair for pair in (SPAN_LIST_COLUMNS, SPAN_COLUMNS, TOKEN_MASK_COLUMNS) if all(c in column_names for c in pair)]
    if len(found) != 1:
        choices = " or ".join(f"{a!r}/{b!r}" for a, b in (SPAN_LIST_COLUMNS, SPAN_COLUMNS, TOKEN_MASK_COLUMNS))
        what = "none of" if not found else "more than one of"
        raise ValueError(
            f"selection_rule='spans' needs the dataset to say which response tokens count: it has {what} the column "
            f"pairs {choices} (columns: {sorted(column_names)})."
        )
    return found[0]


def _content(response, *, row: int, side: str) -> str:
    """The response's text: the last message's content for conversational rows, else the string itself."""
    content = response[-1]["content"] if isinstance(response, list) else response
    if not isinstance(content, str):
        raise ValueError(
            f"selection_rule='spans' needs each response to end in text, since its spans are character offsets into "
            f"that text: row {row}'s {side} response ends with content {content!r:.80} (a tool call or typed parts)."
        )
    return content


def response_mask(tokenizer, completion_ids: list[int], response, spans, *, row: int, side: str) -> list[int]:
    """0/1 per completion token: 1 where the token's characters overlap one of `spans` of the response text."""
    content = _content(response, row=row, side=side)
    checked = []
    for span in spans:
        start, end = (int(x) for x in span)
        if not 0 <= start <= end <= len(content):
            raise ValueError(
                f"Row {row}: the {side} span [{start}, {end}) does not lie inside the response's {len(content)} characters."
            )
        checked.append((start, end))
    return span_token_mask(tokenizer, completion_ids, content, *checked).astype(int).tolist()


def add_selection_masks(dataset, tokenizer):
    """Add `chosen_selection_mask` / `rejected_selection_mask` (0/1 per response token) to a dataset tokenized by TRL."""
    source = span_source(dataset.column_names)

    def masks(example, index):
        out = {}
        for side, column, mask_column in zip(("chosen", "rejected"), source, MASK_COLUMNS):
            ids, given = example[f"{side}_ids"], example[column]
            if source == TOKEN_MASK_COLUMNS:
                if given is None or len(given) != len(ids):
                    raise ValueError(
                        f"Row {index}: {column!r} has {0 if given is None else len(given)} entries for the {len(ids)} "
                        f"tokens the {side} response has with this tokenizer; give one 0/1 per response token."
                    )
                out[mask_column] = [int(bool(v)) for v in given]
            else:
                spans = [given] if source == SPAN_COLUMNS else (given or [])
                out[mask_column] = response_mask(tokenizer, ids, example[side], spans, row=index, side=side)
        return out

    return dataset.map(masks, with_indices=True, desc="Marking the given spans' tokens")


class SelectionMaskCollator:
    """Wraps TRL's preference collator: adds `selection_given`, `(2B, T-1)` bool, from the per-token masks.

    TRL's collator truncates each row to `max_length`, cutting the response's end (`keep_start`) or
    the row's start (`keep_end`); the masks are cut the same way before they are placed.
    """

    def __init__(self, inner: Callable[[list[dict]], dict], *, truncation_mode: str = "keep_start"):
        self.inner = inner
        self.truncation_mode = truncation_mode

    def __call__(self, examples: list[dict]) -> dict:
        missing = [c for c in MASK_COLUMNS if c not in examples[0]]
        if missing:
            raise ValueError(
                f"The batch has no per-token selection masks (columns {missing}); with selection_rule='spans' the "
                "trainer adds them when it prepares the dataset. Pass the raw dataset to the trainer."
            )
        batch = self.inner(examples)
        completion = batch["completion_mask"].bool()  # (2B, T), before the shift
        rows = [e[MASK_COLUMNS[0]] for e in examples] + [e[MASK_COLUMNS[1]] for e in examples]
        given = torch.zeros(completion.shape, dtype=torch.bool)
        for r, mask in enumerate(rows):
            present = int(completion[r].sum())
            kept = mask[:present] if self.truncation_mode == "keep_start" else mask[len(mask) - present :]
            given[r, completion[r]] = torch.tensor(kept, dtype=torch.bool)
        batch[BATCH_KEY] = given[:, 1:]  # (2B, T-1), on the shifted completion positions
        return batch


def given_keep(inputs: dict, shift_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens a batch's data names: `(chosen, rejected)`, each `(B, T-1)` bool on the shifted completion positions."""
    if BATCH_KEY not in inputs:
        raise ValueError("selection_rule='spans' needs batches from a trainer built with it (they carry the masks).")
    return inputs[BATCH_KEY].to(shift_mask.device)[:, -shift_mask.size(1) :].chunk(2, dim=0)
