"""How far a token score may lie from its exact value: a per-token noise bound, measured per run.

Data flow: per-token log-probs -> token scores -> **their noise bound** (this module) -> selection.

The same weights on the same tokens give other log-probs in another batch layout: padding, batch
size and packing change the kernels' summation order. The difference is not uniform. On CPU in
bf16 (`docs/results/noise_floor.md`) most tokens are bitwise equal between two layouts, and the
largest differences, up to 0.4 nats, sit on tokens of probability below 0.9. A single band sized to
the worst token would call every score within it noise.

So the bound is a step function of the token's log-prob, one value per probability bin, and it is
measured where the run trains (device, dtype, kernels, engine): on the first batch the policy
scores, the trainer runs the same rows again in another layout, each pair alone (a lone pair: in a
batch of two copies), and takes per bin the largest difference seen, across every process
(`calibrate_from_layouts`).
The bound of a bin is twice the largest difference seen in it or in any likelier bin (noise does not
shrink as probability falls), so a bin that few tokens reached still inherits its neighbours'.
A score compares two log-probs of the same token; its bound is the bound at the lower of the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Upper edges (log-probs) of the bins, likeliest first: p > 0.999, 0.99, 0.9, 0.5, 0.1, 0.01, 1e-3, 1e-4, below.
LOGP_EDGES = tuple(math.log(p) for p in (0.999, 0.99, 0.9, 0.5, 0.1, 0.01, 1e-3, 1e-4))
# The bound is this many times the largest layout difference seen: a handful of rows sees a bin's typical
# worst case, not its tail.
SAFETY_FACTOR = 2.0


def logp_bins(logps: Tensor) -> Tensor:
    """Bin index (0: likeliest) of each log-prob, same shape, int64. NaN and -inf land in the last bin."""
    edges = torch.tensor(LOGP_EDGES, dtype=torch.float32, device=logps.device)
    # Edges descend: the bin is the number of edges strictly above the value.
    return (logps.float().unsqueeze(-1) <= edges).sum(-1) if logps.numel() else logps.long()


@dataclass(frozen=True)
class NoiseBound:
    """A per-token bound (nats) on a score's distance from its exact value.

    Attributes:
        per_bin: One bound per log-prob bin (`LOGP_EDGES`, likeliest first), non-decreasing.
        source: How it was obtained, for logs and errors (`measured on 8 pairs`, `score_tie_tolerance`).
    """

    per_bin: tuple[float, ...]
    source: str

    @classmethod
    def uniform(cls, nats: float, *, source: str) -> NoiseBound:
        """The same bound for every token (a user's `score_tie_tolerance`)."""
        return cls(per_bin=(float(nats),) * (len(LOGP_EDGES) + 1), source=source)

    @classmethod
    def from_bin_maxima(cls, maxima: Tensor, *, source: str) -> NoiseBound:
        """From the largest layout difference seen per bin (`(n_bins,)`, 0 where none was seen)."""
        envelope = torch.cummax(maxima.double().cpu(), dim=0).values * SAFETY_FACTOR
        return cls(per_bin=tuple(float(v) for v in envelope), source=source)

    def widened(self, nats: float, *, reason: str) -> NoiseBound:
        """At least `nats` for every token (values whose noise this run could not measure)."""
        return NoiseBound(per_bin=tuple(max(v, nats) for v in self.per_bin), source=f"{self.source}; at least {nats:g} ({reason})")

    def __call__(self, *logps: Tensor) -> Tensor:
        """The bound `(B, T)` for scores made of these `(B, T)` log-probs: each token's bin is that of the
        least likely of them (where the noise is largest)."""
        lowest = logps[0].float()
        for other in logps[1:]:
            lowest = torch.minimum(lowest, other.float())
        table = torch.tensor(self.per_bin, dtype=torch.float32, device=lowest.device)
        return table[logp_bins(lowest)]

    def largest(self) -> float:
        return self.per_bin[-1]


def bin_maxima(first: Tensor, second: Tensor, mask: Tensor) -> Tensor:
    """Per log-prob bin, the largest `|first - second|` over the masked tokens: `(n_bins,)` float32.

    Args:
        first: Shape `(B, T)`. Log-probs in one layout (their bins are taken from these).
        second: Shape `(B, T)`. The same tokens' log-probs in another layout.
        mask: Shape `(B, T)`, bool.
    """
    difference = (first.float() - second.float()).abs()[mask]  # (N,)
    bins = logp_bins(first.float()[mask])  # (N,)
    maxima = torch.zeros(len(LOGP_EDGES) + 1, dtype=torch.float32, device=first.device)
    if difference.numel():
        maxima.scatter_reduce_(0, bins, difference.nan_to_num(nan=float("inf")), reduce="amax")
    return maxima


def one_pair_rows(inputs: dict, index: int) -> dict:
    """Pair `index` of a collated batch (rows `index` and `B + index` of every `(2B, ...)` tensor), its padding
    trimmed to its own length: the same tokens in another layout."""
    rows = inputs["input_ids"].size(0)
    picked = torch.tensor([index, rows // 2 + index], device=inputs["input_ids"].device)
    out = {key: value.index_select(0, picked) if torch.is_tensor(value) and value.dim() and value.size(0) == rows else value
           for key, value in inputs.items()}  # fmt: skip
    length = int(out["attention_mask"].bool().any(0).nonzero().max()) + 1 if out["attention_mask"].any() else 1
    width = inputs["input_ids"].size(1)
    return {key: value[:, :length] if torch.is_tensor(value) and value.dim() == 2 and value.size(1) == width else value
            for key, value in out.items()}  # fmt: skip


def pair_twice(inputs: dict) -> dict:
    """A one-pair batch with its pair repeated (`[c, c; r, r]`): the same tokens in a batch of another size."""
    rows = inputs["input_ids"].size(0)
    picked = torch.tensor([0, 0, 1, 1], device=inputs["input_ids"].device)
    return {key: value.index_select(0, picked) if torch.is_tensor(value) and value.dim() and value.size(0) == rows else value
            for key, value in inputs.items()}  # fmt: skip


@torch.no_grad()
def calibrate_from_layouts(forward, inputs: dict, *, accelerator) -> NoiseBound:
    """Measure the bound on one batch: its log-probs as the batch runs against each pair run alone (a batch of one
    pair against that pair twice).

    Args:
        forward: `batch -> (2B', T'-1)` per-token log-probs of a collated batch (the policy, no gradients).
        inputs: A collated batch `[chosen; rejected]` on the device.
        accelerator: Every process measures its own batch; the maxima are gathered so all share one bound.
    """
    mask = inputs["completion_mask"][:, 1:].bool()  # (2B, T-1)
    batch_logps = forward(inputs)[:, -mask.size(1) :]
    maxima = torch.zeros(len(LOGP_EDGES) + 1, dtype=torch.float32, device=mask.device)
    pairs = mask.size(0) // 2
    if pairs == 1:
        twice = forward(pair_twice(inputs))[:, -mask.size(1) :]  # (4, T-1)
        maxima = bin_maxima(batch_logps, twice[[0, 2]], mask)
        layouts = "against itself twice"
    for index in range(pairs if pairs > 1 else 0):
        alone = one_pair_rows(inputs, index)
        width = alone["input_ids"].size(1) - 1
        alone_logps = forward(alone)[:, -width:]  # (2, T'-1)
        rows = torch.tensor([index, pairs + index], device=mask.device)
        together = batch_logps.index_select(0, rows)[:, :width]
        maxima = torch.maximum(maxima, bin_maxima(together, alone_logps, mask.index_select(0, rows)[:, :width]))
        layouts = "each alone against its batch"
    if accelerator.num_processes > 1:
        maxima = accelerator.gather(maxima.unsqueeze(0)).amax(0)
    processes = f" on each of {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
    return NoiseBound.from_bin_maxima(maxima, source=f"measured on {pairs} pair{'s' if pairs != 1 else ''}{processes}, {layouts}")


# Largest layout differences measured on CPU for the bundled model (docs/results/noise_floor.md), used only
# for stored values made in a coarser dtype than the policy computes in, whose noise a run cannot measure.
STORED_DTYPE_FLOORS = {torch.float16: 0.060, torch.bfloat16: 0.41}


def coarser_stored_dtypes(compute: set[torch.dtype], stored: set[torch.dtype]) -> set[torch.dtype]:
    """Dtypes of stored values noisier than anything the policy computes in (bf16 is the coarsest)."""
    precision = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
    finest = min((precision.get(d, 23) for d in compute), default=23)
    return {d for d in stored if d in STORED_DTYPE_FLOORS and precision[d] < finest}


def run_bound(forward, inputs: dict, *, accelerator, coarser_stored: set[torch.dtype]) -> NoiseBound:
    """A run's bound: measured on `inputs` (`calibrate_from_layouts`), widened by the floor of each coarser dtype its
    stored values were made in."""
    bound = calibrate_from_layouts(forward, inputs, accelerator=accelerator)
    for dtype in sorted(coarser_stored, key=str):
        bound = bound.widened(2 * STORED_DTYPE_FLOORS[dtype], reason=f"stored values computed in {dtype}")
    return bound
