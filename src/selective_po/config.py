"""`SelectiveDPOConfig`: TRL's `DPOConfig` plus the fields Selective-DPO needs.

A TRL user switches by changing the config class; `loss_type="sdpo"` is this class's default, and
every TRL loss type still works unchanged. Bad values fail here, at config time, with a message that
says what is allowed.

Note: TRL ships `trl.experimental.sdpo`, an unrelated method that happens to share the acronym.
`loss_type="sdpo"` here is Selective-DPO (Dong, arXiv 2507.07725), the name its authors used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DPOConfig

from .selection import COUNT_RULES, END_TOKEN_MODES, SELECTION_RULES

SELECTIVE_LOSS_TYPES = ("sdpo", "tgdpo", "tisdpo")
# The loss types that weight every token rather than select some: they read the models below, stored once.
WEIGHTING_LOSS_TYPES = {"tgdpo": ("tgdpo_reward_model_name_or_path",),
                        "tisdpo": ("tisdpo_forward_model_name_or_path", "tisdpo_reverse_model_name_or_path")}
# Dtypes the ranked scores can be computed in apart from the run's own (None).
SCORE_DTYPES = (None, "float32")
# The loss types TRL 1.16's DPOTrainer implements. A test reads them off TRL's source, so an upgrade
# that adds or removes one fails loudly instead of drifting.
TRL_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator is not None and accelerator.is_available())


@dataclass
class SelectiveDPOConfig(DPOConfig):
    r"""Configuration for [`SelectiveDPOTrainer`][selective_po.SelectiveDPOTrainer].

    Everything in `trl.DPOConfig` applies. Changed defaults:

    > - `loss_type`: `["sdpo"]` instead of `["sigmoid"]`.
    > - `bf16`: on only when an accelerator is present (TRL turns it on everywhere, which a CPU-only
    >   machine cannot run); set it explicitly to override.
    > - `dataloader_pin_memory`: off on a CPU-only machine, where there is nothing to pin for (a value you set
    >   is kept).

    Parameters:
        sdpo_threshold:
            Quantile `q` in `[0, 1)` below which tokens are dropped: each response keeps its top
            `1 - q` share of tokens by score (`0.6` keeps the top 40%). `0` keeps every token (DPO).
        ref_model_name_or_path:
            Model used as the reference (a hub id, a local folder, or an embedded name such as
            `smollm2-135m-instruct`). `None` uses TRL's default, a frozen copy of the initial policy.
            Its tokenizer must have the policy's vocabulary.
        ref_logps_cache_dir:
            Where `precompute_ref_log_probs=True` stores per-token reference log-probs (default
            `$SELECTIVE_PO_CACHE/ref_logps`). With `loss_type="sdpo"`, precomputing stores every
            token's value, not TRL's one sum per sequence, and the reference is then never kept in
            memory during training (nor loaded at all when the values are already stored).
    """

    loss_type: list[str] = field(
        default_factory=lambda: ["sdpo"],
        metadata={
            "help": "Type of loss. `sdpo` is Selective-DPO (DPO on the top `1 - sdpo_threshold` share of tokens "
            "by policy-reference gap); `tgdpo` is TGDPO (DPO with token weights from a reward model's token rewards); "
            "`tisdpo` is TIS-DPO (DPO with rank-based token weights from a forward and a reverse DPO model). Also "
            f"accepted, unchanged: TRL's {', '.join(TRL_LOSS_TYPES)}. These three cannot be combined with other loss types."
        },
    )
    sdpo_threshold: float = field(
        default=0.6,
        metadata={
            "help": "Selective-DPO quantile q in [0, 1): each response keeps the top (1 - q) share of its tokens by "
            "score (0.6 keeps the top 40%, 0 keeps every token and equals DPO). Ties at the boundary are all kept."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Reference model for scoring and the DPO log-ratio: a hub id, a local folder or an embedded name "
            "(e.g. `smollm2-135m-instruct`). None: a frozen copy of the initial policy (TRL's default). A stronger "
            "reference (a larger model of the same tokenizer, or a DPO-trained copy) selects better tokens."
        },
    )

    selection_rule: str = field(
        default="scores",
        metadata={
            "help": "How tokens are selected: `scores` (the method), a control: `random` (the same number of "
            "tokens per response, drawn uniformly with a seed derived from `seed`) or `all` (every response token), or "
            "`confidence` (ConfPO, arXiv 2506.08712: the tokens whose policy probability is below their response's mean "
            "token probability; no second model scores them, and sdpo_threshold is unused), or `spans`: the tokens the "
            "data names, kept exactly (columns chosen_spans/rejected_spans: lists of [start, end) character spans of the "
            "response text; chosen_span/rejected_span: one span; or chosen_token_mask/rejected_token_mask: 0/1 per "
            "response token; sdpo_threshold is unused), or `scorer` (this package's variant: the top 1 - sdpo_threshold "
            "share by scores fixed before training, scorer - reference on chosen and reference - scorer on rejected "
            "tokens, from `scorer_model_name_or_path`; needs precompute_ref_log_probs=True)."
        },
    )
    scorer_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "With selection_rule='scorer': the model whose per-token log-probs, against the reference's, fix "
            "the kept tokens before training (e.g. a DPO-trained copy of the policy); the reference still anchors the "
            "loss. Stored once like the reference's values; it must have the policy's vocabulary."
        },
    )
    end_token_selection: str = field(
        default="candidate",
        metadata={
            "help": "How a selection rule treats each response's end-of-turn token (any id in the tokenizer's "
            "eos_token_id or the model's generation_config.eos_token_id): `candidate` ranks it like any other token, "
            "as the published methods do; `keep` always keeps it on both sides; `exclude` never keeps it; `paired` keeps "
            "it on one side only when the rule kept it on the other too. The rule then chooses its share among the other "
            "tokens up to the end of turn (`keep`, `exclude`) or among them and it (`paired`); the tokens after the first "
            "end-of-turn token (a chat template's trailing newline) are then never selected. Selective-DPO and SePO only."
        },
    )
    sdpo_count_rule: str = field(
        default="ceil",
        metadata={
            "help": "How many tokens `scores` keeps per response of n tokens: `ceil` keeps the ceil((1 - q) n) "
            "highest-scoring (ties at the boundary all kept); `quantile` keeps those at or above torch.quantile(scores, "
            "q), as the official Selective-DPO code does, which is one token fewer whenever frac(q n) > q."
        },
    )
    score_tie_tolerance: float | None = field(
        default=None,
        metadata={
            "help": "The scores' noise bound in nats, the same for every token: a response whose every score lies "
            "within it keeps every token (a plain DPO row); every other response is ranked at float32 precision and "
            "keeps the share asked for. None: measured per token at the start of training, on the first batch, by "
            "running its pairs again one at a time (it grows as a token's probability falls, and with the dtype: on "
            "CPU up to 8e-6 nats in float32 and 0.19 in bf16). See docs/selection.md."
        },
    )
    score_dtype: str | None = field(
        default=None,
        metadata={
            "help": "The dtype the ranked scores are computed in. None: the run's own (the training forward's log-probs). "
            "'float32': each batch also runs the policy once more without gradients in float32 (weights upcast for that "
            "pass, autocast off), and the reference, scorer or oracle values are computed in float32 too; the loss keeps "
            "the training forward's log-probs. For bf16 runs whose true score gaps lie below bf16's rounding noise; "
            "it costs one no-grad forward per step (none while the reference is still the policy) and, with bf16 "
            "weights, a float32 copy of them during it. Not with quantized, ZeRO-3 or FSDP-sharded bf16 weights, nor "
            "with map_across_tokenizers. See docs/selection.md."
        },
    )
    tgdpo_reward_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "With loss_type='tgdpo': the reward model, a model DPO-trained on the same data with the policy's "
            "tokenizer. Its per-token log-probs are stored once; the token reward is its log-prob minus the reference's."
        },
    )
    tgdpo_alpha: float = field(
        default=0.5,
        metadata={"help": "TGDPO's alpha: chosen tokens weigh 1 + alpha * beta * r and rejected ones 1 - alpha * beta * r "
                  "(0.5, the official default; 0 is DPO)."},
    )
    tisdpo_forward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "With loss_type='tisdpo': a model DPO-trained on the data (e.g. `selective-po train "
                  "--loss_type sigmoid`), the forward half of the contrastive pair."},
    )
    tisdpo_reverse_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "With loss_type='tisdpo': a model DPO-trained on the data with chosen and rejected swapped "
                  "(`--swap_chosen_rejected`). Token scores are log p_forward - log p_reverse, stored once."},
    )
    tisdpo_score_decimals: int | None = field(
        default=None,
        metadata={"help": "Round TIS-DPO's token scores to this many decimals before ranking them. The official code "
                  "uses 2; None (the default) ranks the float32 scores, since rounding turns small score differences into "
                  "ties that the stable sort then breaks by position (later tokens weigh more)."},
    )
    swap_chosen_rejected: bool = field(
        default=False,
        metadata={"help": "Train on the data with chosen and rejected swapped (and their spans or token masks), to "
                  "learn the reversed preference: TIS-DPO's reverse model."},
    )
    map_across_tokenizers: bool = field(
        default=False,
        metadata={
            "help": "Let the reference (Selective-DPO) or the oracle and its reference (SePO) use another tokenizer "
            "than the policy: they score the response in their own tokens and the values move onto the policy's "
            "tokens through character offsets (see selective_po.alignment). Needs conversational data and stored "
            "values (precompute_ref_log_probs=True)."
        },
    )
    share_prompt: bool | None = field(
        default=None,
        metadata={
            "help": "Run each pair as one row [prompt; chosen; rejected] in which the rejected tokens cannot see the "
            "chosen ones, so the prompt is computed once (policy, live reference and scoring) instead of twice; the "
            "log-probs equal the two-row path up to float rounding. None: on for CPU processes wherever that is exact "
            "(sdpa or eager attention, truncation_mode keep_start, no sliding-window or mixture-of-experts layers, "
            "text only), off on GPUs, where it was measured slower (docs/performance.md). True: required, an error "
            "where not exact. Applies to the selective losses; TRL's losses run as in TRL."
        },
    )
    plot_curves: bool = field(
        default=True,
        metadata={"help": "Write training_curves.png (loss, reward margin and accuracy, kept-token share) to "
                  "output_dir when training ends."},
    )
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={"help": "Whether to pin memory in data loaders. None: on with an accelerator, off on a CPU-only "
                  "machine (there is nothing to pin for, and torch warns on every loader)."},
    )
    ref_logps_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where per-token reference log-probs are stored with precompute_ref_log_probs=True (default: "
            "$SELECTIVE_PO_CACHE/ref_logps). Entries are keyed by data, tokenizer, reference weights, max_length, "
            "truncation mode and dtype, so one directory serves many runs."
        },
    )

    def __post_init__(self):
        # TRL's DPOConfig turns bf16 on unless fp16 is set, which fails on a CPU-only machine.
        cpu_only = self.use_cpu or not _has_accelerator()
        if self.bf16 is None and not self.fp16 and cpu_only:
            self.bf16 = False
        if self.dataloader_pin_memory is None:  # pinning needs an accelerator; torch warns on every loader
            self.dataloader_pin_memory = not cpu_only
        super().__post_init__()  # turns a single `loss_type` string into a list
        self._check_selective_fields()

    _label_smoothing_note = "its sigmoid loss, the one Selective-DPO applies to the kept tokens, ignores it."

    def _allowed_loss_types(self) -> tuple[str, ...]:
        return SELECTIVE_LOSS_TYPES + TRL_LOSS_TYPES

    def _check_selective_fields(self) -> None:
        allowed = self._allowed_loss_types()
        unknown = [name for name in self.loss_type if name not in allowed]
        if unknown:
            raise ValueError(f"Unknown loss_type {unknown}. Allowed: {', '.join(allowed)}.")
        if self.selection_rule not in SELECTION_RULES:
            raise ValueError(f"selection_rule={self.selection_rule!r} is unknown. Allowed: {', '.join(SELECTION_RULES)}.")
        if self.sdpo_count_rule not in COUNT_RULES:
            raise ValueError(f"sdpo_count_rule={self.sdpo_count_rule!r} is unknown. Allowed: {', '.join(COUNT_RULES)}.")
        if self.end_token_selection not in END_TOKEN_MODES:
            raise ValueError(f"end_token_selection={self.end_token_selection!r} is unknown. Allowed: {', '.join(END_TOKEN_MODES)}.")
        if self.end_token_selection != "candidate" and self.loss_type not in (["sdpo"], ["sepo"]):
            raise ValueError(f"end_token_selection={self.end_token_selection!r} decides the end-of-turn token of a token "
                             f"selection (loss_type 'sdpo' or 'sepo'); loss_type={self.loss_type} selects no tokens"
                             + (" (TIS-DPO gives that token weight 0 by its own definition)" if self.loss_type == ["tisdpo"] else "")
                             + ". Leave it unset.")  # fmt: skip
        if self.tisdpo_score_decimals is not None and not (isinstance(self.tisdpo_score_decimals, int) and self.tisdpo_score_decimals >= 0):
            raise ValueError(f"tisdpo_score_decimals={self.tisdpo_score_decimals!r} must be a whole number >= 0 (2: the "
                             "official code's rounding) or None.")  # fmt: skip
        for loss_type, fields in WEIGHTING_LOSS_TYPES.items():
            given = [name for name in fields if getattr(self, name) is not None]
            if given and self.loss_type != [loss_type]:
                raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} read only with "
                                 f"loss_type='{loss_type}' (loss_type is {self.loss_type}): set it, or leave them unset.")  # fmt: skip
        if not self.uses_selection:
            if self.scorer_model_name_or_path is not None:
                raise ValueError(
                    f"scorer_model_name_or_path picks the tokens of the selective losses; TRL's loss_type={self.loss_type} "
                    "uses every token. Leave it unset, or use loss_type='sdpo' with selection_rule='scorer'."
                )
            if self.score_dtype is not None:
                raise ValueError(
                    f"score_dtype={self.score_dtype!r} sets the dtype of the selective losses' token scores; TRL's "
                    f"loss_type={self.loss_type} ranks no tokens. Leave it unset, or use loss_type='sdpo'."
                )
            if self.map_across_tokenizers:
                raise ValueError(
                    f"map_across_tokenizers=True applies to the selective losses' stored per-token values; TRL's "
                    f"loss_type={self.loss_type} compares the policy and the reference on the same token ids. Use a "
                    "reference of the policy's tokenizer, or loss_type='sdpo'."
                )
            return
        if len(self.loss_type) != 1:
            raise ValueError(
                f"loss_type={self.loss_type}: `{self.loss_type[0]}` cannot be combined with other loss types; "
                "use one selective loss type alone."
            )
        self._check_weighting_fields()
        if (self.selection_rule == "scorer") != (self.scorer_model_name_or_path is not None):
            raise ValueError(
                "selection_rule='scorer' needs scorer_model_name_or_path (the model whose scores fix the kept tokens)."
                if self.selection_rule == "scorer"
                else f"scorer_model_name_or_path={self.scorer_model_name_or_path!r} is used only with selection_rule='scorer' "
                f"(selection_rule is {self.selection_rule!r}): set selection_rule='scorer' or leave it unset."
            )
        if self.selection_rule == "scorer" and not self.precompute_ref_log_probs:
            raise ValueError(
                "selection_rule='scorer' fixes the kept tokens before training from stored values: set "
                "precompute_ref_log_probs=True."
            )
        if self.selection_rule == "scorer" and self.map_across_tokenizers:
            raise ValueError(
                "selection_rule='scorer' compares the scorer's and the reference's log-probs on the policy's own tokens, so "
                "both need the policy's tokenizer; map_across_tokenizers (a reference of another tokenizer) is not "
                "supported with it. Leave map_across_tokenizers=False."
            )
        if self.score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype={self.score_dtype!r} is not supported. Allowed: None (the run's dtype) or 'float32'.")
        if self.score_dtype is not None and self.map_across_tokenizers:
            raise ValueError(
                "score_dtype='float32' is not supported with map_across_tokenizers=True (the mapped scoring runs its own "
                "forward): leave score_dtype unset."
            )
        if self.score_tie_tolerance is not None and not self.score_tie_tolerance >= 0.0:
            raise ValueError(f"score_tie_tolerance={self.score_tie_tolerance} must be a number of nats >= 0 (None: measured).")
        if not 0.0 <= self.sdpo_threshold < 1.0:
            raise ValueError(
                f"sdpo_threshold={self.sdpo_threshold} is out of range: it must lie in [0, 1) (0.6 keeps the top 40% "
                "of tokens, 0 keeps all of them)."
            )
        if self.label_smoothing != 0.0:
            raise ValueError(
                f"label_smoothing={self.label_smoothing} has no meaning for loss_type={self.loss_type[0]!r}: TRL reads it "
                f"only in its robust, exo_pair, aot and aot_unpaired losses, and {self._label_smoothing_note} Leave "
                "label_smoothing at 0, or train with one of those loss types."
            )
        # WPO weighs whole responses by a mean over every token, which a selection does not change: refused. SePO's
        # loss has no reference, so LD-DPO's and the f-divergences' log-ratios do not exist in it.
        unsupported = {"use_weighting": self.use_weighting}
        if self.loss_type == ["sepo"]:
            unsupported |= {"ld_alpha": self.ld_alpha is not None, "f_divergence_type": self.f_divergence_type != "reverse_kl"}
        if self.map_across_tokenizers and not self.precompute_ref_log_probs:
            raise ValueError(
                "map_across_tokenizers=True maps stored per-token values; set precompute_ref_log_probs=True (a live "
                "reference with another tokenizer is not supported)."
            )
        reasons = {
            "use_weighting": "WPO's use_weighting=True weighs each pair by means over every token of its responses, which "
            "no token selection or weighting changes; leave it False",
            "ld_alpha": "SePO's loss has no reference, so LD-DPO's length-weighted log-ratios do not exist in it; leave "
            "ld_alpha=None",
            "f_divergence_type": "SePO's loss has no reference, so the f-divergences of its log-ratios do not exist; leave "
            "f_divergence_type='reverse_kl'",
        }
        bad = [name for name, is_set in unsupported.items() if is_set]
        if bad:
            raise ValueError(f"loss_type='{self.loss_type[0]}' does not support " + "; ".join(f"{n}: {reasons[n]}" for n in bad) + ".")

    def _check_weighting_fields(self) -> None:
        """TGDPO's and TIS-DPO's models, and what they cannot be combined with."""
        fields = WEIGHTING_LOSS_TYPES.get(self.loss_type[0])
        if fields is None:
            return
        name = self.loss_type[0]
        missing = [field for field in fields if getattr(self, field) is None]
        if missing:
            raise ValueError(f"loss_type='{name}' needs {' and '.join(missing)}: models DPO-trained on this data with the "
                             "policy's tokenizer (train them with `selective-po train --loss_type sigmoid`"
                             + (", once more with --swap_chosen_rejected for the reverse model)." if name == "tisdpo" else ")."))
        if not self.precompute_ref_log_probs:
            raise ValueError(f"loss_type='{name}' reads per-token values of {' and '.join(fields)} stored once before "
                             "training: set precompute_ref_log_probs=True.")  # fmt: skip
        if self.selection_rule != "scores":
            raise ValueError(f"selection_rule={self.selection_rule!r} picks the tokens of Selective-DPO and SePO; "
                             f"loss_type='{name}' weights every token. Leave selection_rule unset.")  # fmt: skip
        if self.map_across_tokenizers:
            raise ValueError(f"loss_type='{name}' compares models on the policy's own tokens, so they need its tokenizer: "
                             "leave map_across_tokenizers=False.")  # fmt: skip
        if self.score_dtype is not None:
            raise ValueError(f"score_dtype sets the dtype of ranked policy log-probs; loss_type='{name}' ranks only stored "
                             "values (computed in the models' dtype). Leave score_dtype unset.")  # fmt: skip

    @property
    def uses_selection(self) -> bool:
        """Whether the loss is a token-selective one (and so needs per-token reference log-probs)."""
        return any(name in SELECTIVE_LOSS_TYPES + SEPO_LOSS_TYPES for name in self.loss_type)


SEPO_LOSS_TYPES = ("sepo",)
# Selection rules that need no second model: with them SePO's loss runs with no oracle at all.
ORACLE_FREE_RULES = ("confidence", "spans")


@dataclass
class SePOConfig(SelectiveDPOConfig):
    r"""Configuration for [`SePOTrainer`][selective_po.SePOTrainer]: SePO (Yang et al., arXiv 2408.13518).

    An oracle (a model DPO-trained on the target data) and the oracle's own reference (the model it
    was trained from) give every response token a reward `log p_oracle - log p_oracle_ref`, computed
    once and stored. The policy is then trained with no reference model, on the highest-reward share
    of chosen tokens and the lowest-reward share of rejected tokens:
    `loss = -log sigmoid(u(y_w) - u(y_l) - gamma)`, `u(y) = (beta / |S|) sum_{t in S} log pi(y_t)`.

    Changed defaults: `loss_type=["sepo"]`, `beta=1.0`, and `precompute_ref_log_probs=True`, which
    here means the token rewards are scored once and TRL keeps no reference model.

    The same reference-free loss runs with no oracle at all under `selection_rule="confidence"`
    (ConfPO's rule: each response's tokens below its mean token probability under the policy) or
    `"spans"` (the tokens the data names); the oracle fields and the two shares are then unused.

    Parameters:
        oracle_model_name_or_path:
            The oracle: a model DPO-trained on the target preference data. It may be smaller than the
            policy (weak-to-strong). It must share the policy's vocabulary unless
            `map_across_tokenizers=True`.
        oracle_ref_model_name_or_path:
            The model the oracle was trained from (its DPO reference).
        sepo_chosen_share:
            `k_w`: share of each chosen response's tokens kept, highest reward first, in `(0, 1]`.
        sepo_rejected_share:
            `k_l`: share of each rejected response's tokens kept, lowest reward first, in `(0, 1]`.
        sepo_gamma:
            Target margin `gamma` between `u(y_w)` and `u(y_l)`.
    """

    loss_type: list[str] = field(
        default_factory=lambda: ["sepo"],
        metadata={"help": "`sepo`: SePO's reference-free loss over oracle-selected tokens."},
    )
    beta: float = field(default=1.0, metadata={"help": "Scale of the length-normalized log-likelihood u(y)."})
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={"help": "SePO always scores token rewards once and keeps no reference; must stay True."},
    )
    oracle_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Oracle: a model DPO-trained on the target data (hub id, local folder or embedded name)."},
    )
    oracle_ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The model the oracle was DPO-trained from; token rewards are log p_oracle - log p_this."},
    )
    sepo_chosen_share: float = field(
        default=0.3, metadata={"help": "k_w in (0, 1]: share of chosen tokens kept, highest oracle reward first."}
    )
    sepo_rejected_share: float = field(
        default=0.3, metadata={"help": "k_l in (0, 1]: share of rejected tokens kept, lowest oracle reward first."}
    )
    sepo_gamma: float = field(default=0.0, metadata={"help": "Target margin gamma between u(y_w) and u(y_l)."})

    _label_smoothing_note = "SePO's loss is not one of them."

    def _allowed_loss_types(self) -> tuple[str, ...]:
        return SEPO_LOSS_TYPES

    def _check_selective_fields(self) -> None:
        super()._check_selective_fields()
        for name in ("sepo_chosen_share", "sepo_rejected_share"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name}={value} is out of range: it must lie in (0, 1] (0.3 keeps 30% of tokens).")
        if not self.precompute_ref_log_probs:
            raise ValueError(
                "SePO scores the oracle's token rewards once and trains without a reference: leave "
                "precompute_ref_log_probs=True."
            )
        if self.selection_rule == "scorer":
            raise ValueError(
                "selection_rule='scorer' is Selective-DPO's fixed-score variant; SePO's oracle already fixes its tokens "
                "before training: use selection_rule='scores' with oracle_model_name_or_path."
            )
        oracle_fields = ("oracle_model_name_or_path", "oracle_ref_model_name_or_path")
        if self.selection_rule in ORACLE_FREE_RULES:
            given = [n for n in oracle_fields if getattr(self, n) is not None]
            if given or self.map_across_tokenizers:
                unused = given + (["map_across_tokenizers"] if self.map_across_tokenizers else [])
                raise ValueError(
                    f"selection_rule={self.selection_rule!r} picks SePO's tokens without an oracle ("
                    + ("the policy's own low-confidence tokens" if self.selection_rule == "confidence" else "the tokens the data names")
                    + f"), so {' and '.join(unused)} would go unused: leave {'them' if len(unused) > 1 else 'it'} unset."
                )
        missing = [n for n in oracle_fields if getattr(self, n) is None] if self.selection_rule not in ORACLE_FREE_RULES else []
        if missing:
            raise ValueError(
                f"SePO needs {' and '.join(missing)}: the oracle (a model DPO-trained on the target data) and the model "
                "it was trained from. Train one with `selective-po train --loss_type sigmoid ...` first."
            )
        if self.sdpo_count_rule != "ceil":
            raise ValueError("sdpo_count_rule applies to Selective-DPO; SePO keeps ceil(share * n) tokens: leave it 'ceil'.")
        if self.ref_model_name_or_path is not None:
            raise ValueError(
                "SePO trains without a reference model; set oracle_model_name_or_path and "
                "oracle_ref_model_name_or_path instead of ref_model_name_or_path."
            )
        if self.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True moves a reference model towards the policy, and SePO trains without one (its "
                "oracle's rewards are stored once): leave sync_ref_model=False."
            )
