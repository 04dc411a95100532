"""A self-contained HTML page showing which tokens Selective-DPO selects, pair by pair.

Chosen and rejected responses sit side by side; every response token is shaded by its score
(orange: the policy is behind the reference on a chosen token or ahead on a rejected one; blue: the
reverse) and the kept tokens are outlined. The selection is the trainer's own
(`losses.select_sdpo_tokens`, through `evaluation.selected_tokens`) on the trainer's own batches. The page has no script and loads
nothing: it opens from a file, offline, and all dataset text is escaped.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from .evaluation import selected_tokens
from .trainer import SelectiveDPOTrainer


@dataclass
class TokenView:
    text: str
    score: float
    kept: bool


@dataclass
class PairView:
    prompt: str
    chosen: list[TokenView]
    rejected: list[TokenView]


def collect_pair_views(trainer: SelectiveDPOTrainer, *, threshold: float, batch_size: int = 8, rule: str = "scores") -> list[PairView]:
    """Scores and keep flags (under selection `rule`) of every pair of the trainer's `eval_dataset`."""
    views = []
    for row, sides in selected_tokens(trainer, threshold=threshold, batch_size=batch_size, desc="Scoring pairs", rule=rule):
        tokens = {
            side: [TokenView(trainer._tokenizer.decode([t]), float(s), bool(k)) for t, s, k in zip(ids, scores, keep)]
            for side, (ids, scores, keep) in sides.items()
        }
        views.append(PairView(_prompt_text(row["prompt"]), tokens["chosen"], tokens["rejected"]))
    return views


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):  # conversational
        return "\n".join(f"{message['role']}: {message['content']}" for message in prompt)
    return str(prompt)


def _shade(score: float, scale: float) -> str:
    strength = min(abs(score) / scale, 1.0) if scale > 0 else 0.0
    rgb = "230, 120, 20" if score > 0 else "40, 110, 220"
    return f"rgba({rgb}, {0.08 + 0.6 * strength:.3f})"


def _tokens_html(tokens: list[TokenView]) -> str:
    scale = max((abs(t.score) for t in tokens), default=0.0)
    spans = []
    for token in tokens:
        css = "tok kept" if token.kept else "tok"
        spans.append(
            f'<span class="{css}" style="background:{_shade(token.score, scale)}" '
            f'title="score {token.score:+.4f}{", kept" if token.kept else ""}">{html.escape(token.text)}</span>'
        )
    return "".join(spans)


def render_html(views: list[PairView], *, title: str, threshold: float, description: str = "") -> str:
    """The page: a header with the threshold, then one block per pair."""
    blocks = []
    for n, view in enumerate(views, 1):
        columns = []
        for side, tokens in (("chosen", view.chosen), ("rejected", view.rejected)):
            kept = sum(t.kept for t in tokens)
            columns.append(
                f'<div class="side"><h3>{side} <span class="count" data-kept="{kept}" data-tokens="{len(tokens)}">'
                f"{kept} / {len(tokens)} tokens kept</span></h3><div class=\"text\">{_tokens_html(tokens)}</div></div>"
            )
        blocks.append(
            f'<section class="pair"><h2>Pair {n}</h2><pre class="prompt">{html.escape(view.prompt)}</pre>'
            f'<div class="sides">{"".join(columns)}</div></section>'
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.pair {{ border-top: 1px solid #ccc; padding: 0.5em 0 1em; }}
.prompt {{ white-space: pre-wrap; background: #f6f6f6; padding: 0.5em; }}
.sides {{ display: flex; gap: 2em; }}
.side {{ flex: 1; }}
.text {{ white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.9; }}
.tok {{ border-radius: 3px; padding: 1px 0; }}
.tok.kept {{ outline: 2px solid #222; font-weight: 600; }}
.count {{ font-weight: normal; color: #666; font-size: 0.8em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Selective-DPO selection at <code>sdpo_threshold={threshold}</code> (each response keeps its top
{1 - threshold:.0%} of tokens by score; ties at the boundary are all kept). Orange: the policy is
behind the reference on a chosen token or ahead of it on a rejected token (high score); blue: the
reverse. Outlined tokens are kept. Hover a token for its score. {html.escape(description)}</p>
{"".join(blocks)}
</body></html>
"""
