"""Float64 reference implementations, written as directly from the formulas as possible.

Slow (Python loops over rows and tokens) and obviously correct; the fast path in `selective_po`
is checked against these in values and gradients.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def reference_keep_count(n: int, threshold: float) -> int:
    """k = ceil((1 - q) * n), with q read as the decimal it was written as (0.6 is exactly 3/5)."""
    return math.ceil((1 - Fraction(str(threshold))) * n)


# Score differences of at most this much count as ties (selective_po.selection.SCORE_TIE_TOLERANCE).
TIE_TOLERANCE = 9e-5


def reference_keep(scores: torch.Tensor, mask: torch.Tensor, threshold: float, tie_tolerance: float = TIE_TOLERANCE) -> torch.Tensor:
    """Keep every completion token whose score is >= the k-th largest completion score of its row,
    less `tie_tolerance`."""
    rows = []
    for row_scores, row_mask in zip(scores.double().tolist(), mask.bool().tolist()):
        positions = [t for t, real in enumerate(row_mask) if real]
        k = reference_keep_count(len(positions), threshold)
        if k == 0:
            rows.append([False] * len(row_mask))
            continue
        kth = sorted((row_scores[t] for t in positions), reverse=True)[k - 1]
        rows.append([real and row_scores[t] >= kth - tie_tolerance for t, real in enumerate(row_mask)])
    return torch.tensor(rows, dtype=torch.bool).reshape(mask.shape)


def reference_keep_with_noise(scores, mask, threshold: float, bound) -> torch.Tensor:
    """The rule with a per-token noise bound: a row whose every completion score has |s| <= its bound keeps every
    completion token; any other row is `reference_keep` (float32 tie band)."""
    keep = reference_keep(scores, mask, threshold)
    for b, (row_scores, row_mask, row_bound) in enumerate(zip(scores.double().tolist(), mask.bool().tolist(), bound.double().tolist())):
        if not any(real and abs(s) > e for s, real, e in zip(row_scores, row_mask, row_bound)):
            keep[b] = torch.tensor(row_mask)
    return keep


def reference_uncertain(scores, mask, keep, bound) -> torch.Tensor:
    """In rows with a score outside its bound: kept tokens within their bound above the highest dropped score,
    dropped tokens within their bound below the lowest kept score."""
    rows = []
    for row_scores, row_mask, row_keep, row_bound in zip(scores.double().tolist(), mask.bool().tolist(), keep.bool().tolist(),
                                                         bound.double().tolist()):  # fmt: skip
        signal = any(real and abs(s) > e for s, real, e in zip(row_scores, row_mask, row_bound))
        kept = [s for s, real, k in zip(row_scores, row_mask, row_keep) if real and k]
        dropped = [s for s, real, k in zip(row_scores, row_mask, row_keep) if real and not k]
        rows.append([
            real and signal and ((k and bool(dropped) and s - max(dropped) <= e) or (not k and bool(kept) and min(kept) - s <= e))
            for s, real, k, e in zip(row_scores, row_mask, row_keep, row_bound)
        ])  # fmt: skip
    return torch.tensor(rows, dtype=torch.bool).reshape(mask.shape)


def reference_noise_bound(per_bin, edges, *logps) -> torch.Tensor:
    """Each token's bound: `per_bin[i]` where `i` counts the edges (descending log-probs) at or above the lowest
    of the token's log-probs."""
    lowest = torch.stack([lp.double() for lp in logps]).min(0).values
    return torch.tensor([[per_bin[sum(v <= e for e in edges)] for v in row] for row in lowest.tolist()],
                        dtype=torch.float64).reshape(lowest.shape)  # fmt: skip


def reference_sdpo(pc, pr, rc, rr, chosen_mask, rejected_mask, *, threshold, beta, label_smoothing=0.0, scorer=None, bounds=None):
    """Selective-DPO per-example losses in float64, plus the keep masks.

    pc, pr: policy per-token log-probs (float64 leaves if gradients are wanted); rc, rr: reference.
    scorer: `(sc, sr)`, the fixed-score variant: tokens ranked by `sc - rc` (chosen) and `rr - sr`
    (rejected), the policy not involved; the loss is the same.
    bounds: `(chosen, rejected)` per-token noise bounds: rows with no score outside them keep every token.
    """
    if scorer is None:
        chosen_scores = (rc - pc).detach()
        rejected_scores = (pr - rr).detach()
    else:
        chosen_scores, rejected_scores = scorer[0] - rc, rr - scorer[1]
    if bounds is None:
        keep_c = reference_keep(chosen_scores, chosen_mask, threshold)
        keep_r = reference_keep(rejected_scores, rejected_mask, threshold)
    else:
        keep_c = reference_keep_with_noise(chosen_scores, chosen_mask, threshold, bounds[0])
        keep_r = reference_keep_with_noise(rejected_scores, rejected_mask, threshold, bounds[1])
    losses = []
    for b in range(pc.shape[0]):
        chosen = sum((pc[b, t] - rc[b, t] for t in range(pc.shape[1]) if keep_c[b, t]), torch.zeros((), dtype=torch.float64))
        rejected = sum((pr[b, t] - rr[b, t] for t in range(pr.shape[1]) if keep_r[b, t]), torch.zeros((), dtype=torch.float64))
        logit = beta * (chosen - rejected)
        losses.append(
            -(1 - label_smoothing) * torch.log(torch.sigmoid(logit)) - label_smoothing * torch.log(torch.sigmoid(-logit))
        )
    return torch.stack(losses), keep_c, keep_r


def reference_sepo(pc, pr, reward_c, reward_r, chosen_mask, rejected_mask, *, k_w, k_l, beta, gamma):
    """SePO per-example losses in float64: top-k_w chosen by reward, bottom-k_l rejected, length-normalized."""
    keep_c = reference_keep(reward_c, chosen_mask, 1 - k_w)
    keep_r = reference_keep(-reward_r, rejected_mask, 1 - k_l)
    losses = []
    for b in range(pc.shape[0]):
        def u(logps, keep):
            kept = [logps[b, t] for t in range(logps.shape[1]) if keep[b, t]]
            if not kept:
                return torch.zeros((), dtype=torch.float64)
            return beta * sum(kept[1:], kept[0]) / len(kept)

        losses.append(-torch.log(torch.sigmoid(u(pc, keep_c) - u(pr, keep_r) - gamma)))
    return torch.stack(losses), keep_c, keep_r


def reference_tgdpo(pc, pr, rc, rr, mc, mr, chosen_mask, rejected_mask, *, beta, alpha):
    """TGDPO per-example losses in float64, as the official code (dvlab-research/TGDPO, `tgdpo/trainer.py`) computes
    them: per-token log-probs zeroed off the completion, `D = pi - ref`, token rewards `r = rm - ref`, and
    `-log sigmoid(sum_t beta (1 + alpha beta r^c_t) D^c_t - sum_t beta (1 - alpha beta r^r_t) D^r_t)`.

    pc, pr: policy (float64 leaves for gradients); rc, rr: reference; mc, mr: the reward model's log-probs.
    """
    cm, rm_ = chosen_mask.double(), rejected_mask.double()
    pc, pr, rc, rr, mc, mr = pc * cm, pr * rm_, rc * cm, rr * rm_, mc * cm, mr * rm_  # as `per_token_logps * loss_mask`
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    reward_chosen, reward_rejected = mc - rc, mr - rr
    chosen = (beta * (1 + alpha * beta * reward_chosen) * chosen_logratios).sum(-1)
    rejected = (beta * (1 - alpha * beta * reward_rejected) * rejected_logratios).sum(-1)
    return -torch.nn.functional.logsigmoid(chosen - rejected)


def python_rank_weights(values: list[float], low: float = 0.7, high: float = 1.3) -> list[float]:
    """TIS-DPO's `rank_based` transform: the values ranked ascending by a stable sort, the `i`-th of `n` weighted
    `low + (high - low) * i / (n - 1)`, a lone value 1.0."""
    order = sorted(range(len(values)), key=lambda k: values[k])
    weights = [0.0] * len(values)
    for rank, index in enumerate(order):
        weights[index] = 1.0 if len(values) == 1 else low + rank / (len(values) - 1) * (high - low)
    return weights


def reference_tisdpo_weights(forward, reverse, mask, end, *, chosen: bool, decimals=2) -> torch.Tensor:
    """TIS-DPO's token weights `(B, T)` as the official code (exlaw/TIS-DPO) builds them, row by row in Python.

    `token_weight_estimation.py`: each response token's raw weight is `score_2 - score_1`, the reverse model's
    log-prob minus the forward model's, computed in float32 and rounded with Python's `round(float(w), 2)`.
    `preference_datasets.py`: chosen weights are negated, then ranked (`rank_based`); the end-of-sequence token the
    code appends weighs 0 (here: `end`, the end token and anything after it), as do prompt and padding.
    forward, reverse: `(B, T)` float32 log-probs of the two models. decimals=None skips the rounding.
    """
    rows = []
    for b in range(mask.shape[0]):
        text = [t for t in range(mask.shape[1]) if mask[b, t] and not end[b, t]]
        raw = [float(reverse[b, t].float() - forward[b, t].float()) for t in text]  # float32 subtraction, as numpy
        raw = [round(w, decimals) if decimals is not None else w for w in raw]
        ranked = python_rank_weights([-w for w in raw] if chosen else raw)
        row = [0.0] * mask.shape[1]
        for t, w in zip(text, ranked):
            row[t] = w
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).reshape(mask.shape)


def reference_tisdpo(pc, pr, rc, rr, weights_c, weights_r, chosen_mask, rejected_mask, *, beta):
    """TIS-DPO per-example losses in float64 (`trainers.py`, `token_level: false`): the margins
    `sum_t w_t (pi_t - ref_t)` of each side, and `-log sigmoid(beta (margin_c - margin_r))`."""
    chosen = ((pc - rc) * weights_c * chosen_mask.double()).sum(-1)
    rejected = ((pr - rr) * weights_r * rejected_mask.double()).sum(-1)
    return -torch.nn.functional.logsigmoid(beta * (chosen - rejected))


def reference_ld_weights(chosen_mask, rejected_mask, alpha) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's per-token weights in float64: per pair, the first `min(n_c, n_r)` completion tokens of each response
    weigh 1, the rest `alpha`, everything off the completion 0."""
    out = []
    for mask in (chosen_mask, rejected_mask):
        rows = []
        for b in range(mask.shape[0]):
            shared = min(int(chosen_mask[b].sum()), int(rejected_mask[b].sum()))
            row, seen = [], 0
            for real in mask[b].tolist():
                seen += bool(real)
                row.append(0.0 if not real else (1.0 if seen <= shared else alpha))
            rows.append(row)
        out.append(torch.tensor(rows, dtype=torch.float64).reshape(mask.shape))
    return out[0], out[1]


def reference_f_divergence(logratio: float, kind: str, alpha: float = 0.5) -> float:
    """`f'(t)` at `t = exp(logratio)`, written from each divergence's definition."""
    t = math.exp(logratio)
    if kind == "reverse_kl":
        return math.log(t)
    if kind == "forward_kl":
        return 1 - 1 / t
    if kind == "js_divergence":
        return math.log(2 * t / (1 + t))
    return (t ** (alpha - 1) - 1) / (alpha - 1)


def reference_end_token_selection(scores_c, scores_r, ids_c, ids_r, mask_c, mask_r, end_ids, *, share_c, share_r, mode):
    """Kept tokens of a top-share selection under an `end_token_selection` mode, row by row from the token ids.

    candidate: the top share of every completion token. keep / exclude: the top share of the tokens before each
    response's first end-of-turn token (the whole completion where it has none), plus that token under keep.
    paired: the top share of the tokens up to and including it, its end token kept only where the other side of
    the pair kept its own. Tokens after the first end-of-turn token are never kept outside candidate.
    """
    def first_end(ids, mask):
        return next((t for t, (i, real) in enumerate(zip(ids, mask)) if real and i in end_ids), None)

    def candidates(ids, mask):
        if mode == "candidate":
            return list(mask)
        end = first_end(ids, mask)
        if end is None:
            return list(mask)
        last = end if mode == "paired" else end - 1
        return [real and t <= last for t, real in enumerate(mask)]

    keep = []
    for scores, ids, mask, share in ((scores_c, ids_c, mask_c, share_c), (scores_r, ids_r, mask_r, share_r)):
        allowed = torch.tensor([candidates(i, m) for i, m in zip(ids.tolist(), mask.bool().tolist())], dtype=torch.bool)
        keep.append(reference_keep(scores, allowed.reshape(mask.shape), 1 - share))
    ends = [[first_end(i, m) for i, m in zip(ids.tolist(), mask.bool().tolist())] for ids, mask in ((ids_c, mask_c), (ids_r, mask_r))]
    for b in range(mask_c.shape[0]):
        end_c, end_r = ends[0][b], ends[1][b]
        if mode == "keep":
            for side, end in ((0, end_c), (1, end_r)):
                if end is not None:
                    keep[side][b, end] = True
        if mode == "paired":
            both = end_c is not None and end_r is not None and bool(keep[0][b, end_c]) and bool(keep[1][b, end_r])
            for side, end in ((0, end_c), (1, end_r)):
                if end is not None and not both:
                    keep[side][b, end] = False
    return keep[0], keep[1]


def reference_kept_dpo(pc, pr, rc, rr, keep_c, keep_r, *, beta):
    """DPO's sigmoid loss per example on the kept tokens' log-ratio sums, in float64."""
    losses = []
    for b in range(pc.shape[0]):
        chosen = sum((pc[b, t] - rc[b, t] for t in range(pc.shape[1]) if keep_c[b, t]), torch.zeros((), dtype=torch.float64))
        rejected = sum((pr[b, t] - rr[b, t] for t in range(pr.shape[1]) if keep_r[b, t]), torch.zeros((), dtype=torch.float64))
        losses.append(-torch.log(torch.sigmoid(beta * (chosen - rejected))))
    return torch.stack(losses)
