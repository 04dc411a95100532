"""Malformed preference data fails early, naming the source, row and field."""

import pytest
from datasets import Dataset

from conftest import preference_dataset
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer
from selective_po.data import check_preference_dataset


def rows_with(index, field, value):
    rows = preference_dataset().to_list()
    rows[index][field] = value
    return rows


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("chosen", [{"role": "assistant", "content": "  "}], "row 2, field 'chosen': the response message is empty"),
        ("rejected", [], "row 2, field 'rejected': the response has no messages"),
        ("prompt", [{"content": "no role"}], "message 0 is not a {'role': str, 'content': ...} mapping"),
    ],
)
def test_malformed_conversational_rows(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{").replace("[", r"\[")):
        check_preference_dataset(Dataset.from_list(rows_with(2, field, value)), source="mydata")


def test_non_string_content():
    rows = preference_dataset().to_list()
    for row in rows:  # Arrow needs one type per column
        row["chosen"] = [{"role": "assistant", "content": 7}]
    with pytest.raises(ValueError, match=r"row 0, field 'chosen': message 0 has content 7, which is neither a string, a list of \{'type': \.\.\.\} parts, nor None beside tool_calls"):
        check_preference_dataset(Dataset.from_list(rows), source="mydata")


def test_malformed_standard_rows_and_mixed_formats():
    standard = [{"prompt": "Q?", "chosen": "A.", "rejected": "B."}, {"prompt": "Q2?", "chosen": "", "rejected": "C."}]
    with pytest.raises(ValueError, match="mydata, row 1, field 'chosen': the response is empty"):
        check_preference_dataset(Dataset.from_list(standard), source="mydata")
    mixed = Dataset.from_dict({"prompt": ["Q?"], "chosen": ["A."], "rejected": [3]})
    with pytest.raises(ValueError, match="row 0, field 'rejected': expected a string or a list of messages, got int"):
        check_preference_dataset(mixed, source="mydata")


def test_empty_dataset():
    with pytest.raises(ValueError, match="mydata has no rows"):
        check_preference_dataset(preference_dataset().select([]), source="mydata")


def test_trainer_checks_before_tokenizing(tmp_path, tiny_model_dir):
    bad = Dataset.from_list(rows_with(5, "rejected", [{"role": "assistant", "content": ""}]))
    args = SelectiveDPOConfig(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(ValueError, match="train_dataset, row 5, field 'rejected'"):
        SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=bad)
    with pytest.raises(ValueError, match="eval_dataset, row 5"):
        SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset(), eval_dataset=bad)


def test_mixing_formats_within_a_row():
    mixed = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": "Q?"}]], "chosen": ["A."], "rejected": ["B."]}
    )
    with pytest.raises(ValueError, match="row 0 mixes plain strings and lists of messages"):
        check_preference_dataset(mixed, source="mydata")


def test_a_turn_without_content_must_call_a_tool():
    rows = preference_dataset().to_list()
    for row in rows:
        row["chosen"] = [{"role": "assistant", "content": None, "tool_calls": None}]
    with pytest.raises(ValueError, match=r"row 0, field 'chosen': message 0 has no content \(None\) and no tool_calls"):
        check_preference_dataset(Dataset.from_list(rows), source="mydata")
