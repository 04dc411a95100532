"""SelectiveDPOConfig: defaults, validation at config time, and the TRL loss list kept in sync."""

import inspect
import re

import pytest
from trl import DPOTrainer

from selective_po import SelectiveDPOConfig, SePOConfig
from selective_po.config import TRL_LOSS_TYPES


def make(**kwargs):
    return SelectiveDPOConfig(output_dir="unused", report_to="none", **kwargs)


def test_defaults_are_selective_dpo_on_cpu():
    config = make()
    assert config.loss_type == ["sdpo"] and config.sdpo_threshold == 0.6
    assert config.ref_model_name_or_path is None
    assert config.bf16 is False  # this machine has no accelerator; TRL would default to True and fail


@pytest.mark.parametrize("threshold", [-0.1, 1.0, 1.5])
def test_threshold_out_of_range(threshold):
    with pytest.raises(ValueError, match=r"sdpo_threshold=.* must lie in \[0, 1\)"):
        make(sdpo_threshold=threshold)


def test_unknown_loss_type_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="Unknown loss_type.*Allowed: sdpo, tgdpo, tisdpo, sigmoid"):
        make(loss_type="sdp0")


def test_sdpo_cannot_be_combined():
    with pytest.raises(ValueError, match="cannot be combined"):
        make(loss_type=["sdpo", "sft"], loss_weights=[1.0, 1.0])


def test_wpo_weighting_fails_at_config_time():
    with pytest.raises(ValueError, match="use_weighting"):
        make(use_weighting=True)


@pytest.mark.parametrize("field, value", [("ld_alpha", 0.5), ("f_divergence_type", "js_divergence")])
def test_ld_alpha_and_f_divergences_apply_to_the_reference_anchored_losses(field, value, tmp_path):
    assert getattr(make(**{field: value}), field) == value
    with pytest.raises(ValueError, match=f"{field}: SePO's loss has no reference"):
        SePOConfig(output_dir=str(tmp_path), oracle_model_name_or_path="o", oracle_ref_model_name_or_path="r", **{field: value})


def test_trl_loss_types_still_accepted_without_selection_checks():
    config = make(loss_type="sigmoid", sdpo_threshold=0.6, precompute_ref_log_probs=True)
    assert config.loss_type == ["sigmoid"] and not config.uses_selection


def test_trl_loss_list_matches_trl_source():
    """Fails when a TRL upgrade adds or drops a DPO loss type."""
    source = inspect.getsource(DPOTrainer._compute_loss)
    assert set(re.findall(r'loss_type == "(\w+)"', source)) == set(TRL_LOSS_TYPES)


def test_score_dtype_is_float32_or_the_runs_own():
    assert make(score_dtype="float32").score_dtype == "float32"
    with pytest.raises(ValueError, match=r"score_dtype='bfloat16' is not supported.*'float32'"):
        make(score_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"score_dtype='float32'.*ranks no tokens"):
        make(score_dtype="float32", loss_type="sigmoid")
    with pytest.raises(ValueError, match=r"score_dtype='float32' is not supported with map_across_tokenizers"):
        make(score_dtype="float32", map_across_tokenizers=True, precompute_ref_log_probs=True)
