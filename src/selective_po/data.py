"""Load preference datasets and check they have the columns training needs.

Data flow: **data** (this module: rows of ``prompt`` / ``chosen`` / ``rejected``)
-> tokens (TRL's preference preprocessing applies the chat template and tokenizes)
-> per-token selection and weights -> loss -> trainer.

A dataset is named by one string, resolved in this order:

1. a bundled dataset name (see ``BUNDLED_DATASETS``), shipped inside the package;
2. an existing local path: a ``.json`` / ``.jsonl`` / ``.parquet`` file, a folder
   written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a folder
   of data files;
3. otherwise a Hugging Face Hub dataset name.

A string that looks like a local path but does not exist is an error, never a Hub
lookup, so a typo in a path is reported as such. Local JSON files are read and checked here
before `datasets` sees them, so an empty file, a line that is not UTF-8 or not JSON, or a row
without a field is an error naming the file, line and field rather than one from inside `datasets`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
from transformers.utils import logging

logger = logging.get_logger(__name__)

BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED_DATASETS: dict[str, Path] = {
    # Two-digit arithmetic; regenerate with scripts/make_arithmetic_data.py.
    "arithmetic": BUNDLED_DIR / "arithmetic",
    "onpolicy-smollm2": BUNDLED_DIR / "onpolicy_smollm2",
    # 2,000 prompts, 8 samples each, with a validation split; the on-policy experiment's data.
    "onpolicy-smollm2-large": BUNDLED_DIR / "onpolicy_smollm2_large",
}
BUNDLED_SPLITS = ("train", "test")  # every bundled dataset has these; `validation.jsonl` where there is one

# File suffix -> `datasets` builder name.
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Marker files written by Dataset.save_to_disk and DatasetDict.save_to_disk.
SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")

REQUIRED_COLUMNS = ("chosen", "rejected")
FORMAT_HELP = (
    "Expected TRL's preference dataset format: 'chosen' and 'rejected' (and 'prompt', unless both responses start "
    "with it), each a string or a list of {'role', 'content'} messages, one format for every row."
)


def load_preference_dataset(
    name_or_path: str, *, split: str | None = None, config_name: str | None = None
) -> datasets.Dataset | datasets.DatasetDict:
    """Load a preference dataset by bundled name, local path or Hub name.

    Args:
        name_or_path: bundled name (e.g. ``"arithmetic"``), local file or folder, or Hub dataset name.
        split: return only this split as a ``Dataset``; when ``None`` return all splits as a
            ``DatasetDict``. Single files, and folders saved from a single ``Dataset``, hold one
            split named ``"train"``.
        config_name: Hub dataset configuration; only valid for Hub datasets.

    Raises:
        FileNotFoundError: ``name_or_path`` looks like a local path but does not exist.
        ValueError: ``split`` is missing (the message lists the available ones), the file type
            is unsupported, or a returned split lacks the preference columns.
    """
    splits = _load_all_splits(name_or_path, config_name=config_name)
    if split is None:
        for split_name, dataset in splits.items():
            check_preference_dataset(dataset, source=f"{name_or_path!r} split {split_name!r}")
        return splits
    dataset = _select_split(splits, split, source=name_or_path)
    check_preference_dataset(dataset, source=f"{name_or_path!r} split {split!r}")
    return dataset


def load_preference_split(
    name_or_path: str, split: str | None = None, *, preferred: str = "test", flag: str = "--split"
) -> tuple[datasets.Dataset, str]:
    """One split of a preference dataset, and its name, for commands that read one split.

    `split=None` picks `preferred` when the dataset has it, else its only split (a single file is
    one split, `train`). A split that is not there is an error listing the splits there are and
    naming `flag`, the option that picks one.
    """
    splits = _load_all_splits(name_or_path, config_name=None)
    available = sorted(splits)
    if split is None:
        split = preferred if preferred in splits else available[0] if len(available) == 1 else None
        if split is None:
            raise ValueError(
                f"Dataset {name_or_path!r} has splits {available} and none is called {preferred!r}; pick one with {flag}."
            )
    elif split not in splits:
        raise ValueError(f"Dataset {name_or_path!r} has no split {split!r}; it has {available}. Pick one with {flag}.")
    check_preference_dataset(splits[split], source=f"{name_or_path!r} split {split!r}")
    return splits[split], split


def check_preference_dataset(dataset: datasets.Dataset, *, source: str) -> None:
    """Columns, then every row: raise ``ValueError`` naming the source, row and field of the first problem."""
    check_preference_columns(dataset, source=source)
    check_preference_rows(dataset, source=source)


def check_preference_rows(dataset: datasets.Dataset, *, source: str) -> None:
    """Raise ``ValueError`` at the first malformed row: empty data, an empty or non-string response,
    malformed conversational messages, or a row that mixes the standard and conversational formats.
    """
    if len(dataset) == 0:
        raise ValueError(f"Preference dataset {source} has no rows.")
    fields = [name for name in ("prompt", "chosen", "rejected") if name in dataset.column_names]
    for index, row in enumerate(dataset.select_columns(fields)):
        formats = set()
        for name in fields:
            problem, kind = _field_problem(row[name], required=name != "prompt")
            if problem:
                raise ValueError(f"Preference dataset {source}, row {index}, field {name!r}: {problem}. {FORMAT_HELP}")
            formats.add(kind)
        if len(formats) > 1:
            raise ValueError(
                f"Preference dataset {source}, row {index} mixes plain strings and lists of messages across "
                f"{fields}; use one format for all of them. {FORMAT_HELP}"
            )


def _field_problem(value, *, required: bool) -> tuple[str | None, str]:
    """(what is wrong with one prompt/chosen/rejected value, or None; its format)."""
    if isinstance(value, str):
        if required and not value.strip():
            return "the response is empty", "standard"
        return None, "standard"
    if isinstance(value, list):
        if required and not value:
            return "the response has no messages", "conversational"
        for position, message in enumerate(value):
            problem = _message_problem(message)
            if problem:
                return f"message {position} {problem}", "conversational"
        last = value[-1]["content"] if value else None
        if required and isinstance(last, str) and not last.strip():
            return "the response message is empty", "conversational"
        return None, "conversational"
    return f"expected a string or a list of messages, got {type(value).__name__} {value!r:.80}", "other"


def _message_problem(message) -> str | None:
    """What is wrong with one chat message, as TRL's chat-template tokenization reads it, or None.

    Content is text, a list of typed parts (`[{"type": "text", "text": ...}]`, as multimodal chat
    formats write it; the chat template renders them), or `None` on a turn that calls tools.
    """
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        return f"is not a {{'role': str, 'content': ...}} mapping: {message!r:.80}"
    content = message.get("content")
    if isinstance(content, str):
        return None
    if content is None:
        return None if message.get("tool_calls") else "has no content (None) and no tool_calls"
    if isinstance(content, list) and all(isinstance(part, dict) and isinstance(part.get("type"), str) for part in content):
        return None
    return (f"has content {content!r:.80}, which is neither a string, a list of {{'type': ...}} parts, nor None "
            "beside tool_calls")  # fmt: skip


def swapped_preferences(kwargs: dict) -> dict:
    """The trainer's keyword arguments with `chosen` and `rejected` swapped in every dataset given (with their spans
    or token masks), so that a run learns the reversed preference: TIS-DPO's reverse model."""
    def swap(dataset):
        names = dataset.column_names
        pairs = [(f"chosen{suffix}", f"rejected{suffix}") for suffix in ("", "_span", "_spans", "_token_mask")]
        if "chosen" not in names or "rejected" not in names:
            raise ValueError(f"swap_chosen_rejected needs 'chosen' and 'rejected' columns; the dataset has {names}.")
        renames = {a: b for pair in pairs if set(pair) <= set(names) for a, b in (pair, pair[::-1])}
        return dataset.rename_columns({name: f"__swap__{renames[name]}" for name in renames}).rename_columns(
            {f"__swap__{renames[name]}": renames[name] for name in renames})  # fmt: skip

    swapped = dict(kwargs)
    for key in ("train_dataset", "eval_dataset"):
        given = kwargs.get(key)
        if given is not None:
            swapped[key] = {name: swap(d) for name, d in given.items()} if isinstance(given, dict) else swap(given)
    return swapped


def report_dropped_rows(before: int, after: int, *, name: str, max_length: int | None) -> None:
    """One line for the rows TRL's tokenization dropped because their prompt alone fills `max_length`.

    TRL drops them (with `truncation_mode="keep_start"` the collator would cut every response token);
    a dataset left with no row at all is an error rather than an empty run.
    """
    if after == before:
        return
    if after == 0:
        raise ValueError(
            f"Every row of the {name} dataset ({before}) has a prompt of max_length={max_length} tokens or more, so "
            "none of their response tokens could be trained on. Raise max_length, or shorten the prompts."
        )
    logger.warning(
        f"Dropped {before - after} of {before} rows of the {name} dataset, as TRL does: their prompts alone fill "
        f"max_length={max_length} tokens, so none of their response tokens would be trained on. Raise max_length to "
        "keep them."
    )


def check_preference_columns(dataset: datasets.Dataset, *, source: str) -> None:
    """Raise ``ValueError`` if ``dataset`` lacks the preference columns.

    ``chosen`` and ``rejected`` are always required; ``prompt`` is optional because TRL
    extracts an implicit prompt shared by both responses.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"check_preference_columns expects a datasets.Dataset for {source}, got "
            f"{type(dataset).__name__}; pass a single split, e.g. dataset['train']."
        )
    columns = dataset.column_names
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise ValueError(
            f"Preference dataset {source} is missing column(s) {missing}; it has {columns}. {FORMAT_HELP}"
        )


def _load_all_splits(name_or_path: str, *, config_name: str | None) -> datasets.DatasetDict:
    """Resolve ``name_or_path`` (bundled, local, Hub) and load every split."""
    local = Path(name_or_path).expanduser()
    if config_name is not None and (name_or_path in BUNDLED_DATASETS or local.exists()):
        raise ValueError(
            f"config_name={config_name!r} only applies to Hub datasets, but {name_or_path!r} "
            "is a bundled dataset or local path; drop config_name."
        )
    if name_or_path in BUNDLED_DATASETS:
        return _load_bundled(name_or_path)
    if local.exists():
        return _load_local(local)
    if looks_like_local_path(name_or_path):
        raise FileNotFoundError(
            f"Dataset path {name_or_path!r} does not exist. Check the path, or pass a bundled "
            f"name ({sorted(BUNDLED_DATASETS)}) or a Hub dataset name."
        )
    return datasets.load_dataset(name_or_path, config_name)


def looks_like_local_path(name_or_path: str) -> bool:
    """True for strings meant as local paths rather than Hub names such as ``org/name``.

    On POSIX ``os.sep`` is "/", which also separates a Hub organisation from the dataset
    name, so "/" marks a local path only when leading or when used more than once.
    """
    if os.sep != "/" and os.sep in name_or_path:
        return True
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        return True
    return Path(name_or_path).suffix.lower() in DATA_FILE_BUILDERS


def load_task_prompts(name_or_path: str, *, split: str, fallback: datasets.Dataset | None = None) -> list[dict]:
    """Prompts with a verifiable task (`task`/`answer` columns) for greedy accuracy.

    A JSON-lines file is read as is. A bundled name or a local folder gives its `{split}_prompts.jsonl`
    when it has one (every held-out prompt, also those that yielded no pair); otherwise the rows of
    `fallback` that carry a task. Rows without a verifiable task give an empty list.
    """
    path = Path(name_or_path)
    if path.is_file():
        rows = read_json_records(path)
    else:
        folder = BUNDLED_DATASETS.get(name_or_path, path)
        candidate = folder / f"{split}_prompts.jsonl"
        if candidate.is_file():
            rows = read_json_records(candidate)
        elif fallback is not None:
            rows = fallback.to_list()
        else:
            rows = []
    return [row for row in rows if row.get("task") is not None or row.get("answer") is not None]


def _load_bundled(name: str) -> datasets.DatasetDict:
    """Load a bundled dataset's ``train.jsonl`` and ``test.jsonl``."""
    folder = BUNDLED_DATASETS[name]
    files = {split: folder / f"{split}.jsonl" for split in BUNDLED_SPLITS}
    absent = [str(path) for path in files.values() if not path.is_file()]
    if absent:
        raise FileNotFoundError(
            f"Bundled dataset {name!r} is incomplete, missing {absent}. Reinstall the package or "
            "regenerate the data with scripts/make_arithmetic_data.py."
        )
    if (folder / "validation.jsonl").is_file():
        files["validation"] = folder / "validation.jsonl"
    return _load_split_files({split: str(path) for split, path in files.items()})


def _load_local(path: Path) -> datasets.DatasetDict:
    """Load an existing local file or folder."""
    if path.is_file():
        return _load_data_file(path)
    if any((path / marker).is_file() for marker in SAVE_TO_DISK_MARKERS):
        loaded = datasets.load_from_disk(str(path))
        # A saved single Dataset becomes split "train", like a single data file.
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    split_files = {split: path / f"{split}.jsonl" for split in ("train", "validation", "test")}
    split_files = {split: str(file) for split, file in split_files.items() if file.is_file()}
    if split_files:
        # Exactly `{split}.jsonl` (as `build-pairs` writes): `datasets`' own folder patterns would also take
        # `samples-train.jsonl` and `test_prompts.jsonl` into the splits.
        return _load_split_files(split_files)
    return datasets.load_dataset(str(path))


def _load_split_files(files: dict[str, str]) -> datasets.DatasetDict:
    """One JSON-lines file per split, each with its own inferred schema: a split whose rows all have an
    empty list or a null in some column (e.g. only arithmetic rows) must not be cast to another split's types."""
    return datasets.DatasetDict({split: _load_json_file(Path(file)) for split, file in files.items()})


def _load_data_file(path: Path) -> datasets.DatasetDict:
    """Load a single ``.json`` / ``.jsonl`` / ``.parquet`` file as split ``"train"``."""
    builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"Unsupported dataset file {str(path)!r}: expected one of {sorted(DATA_FILE_BUILDERS)}. "
            "Convert it, or put it in a folder that datasets.load_dataset can read."
        )
    if builder == "json":
        return datasets.DatasetDict({"train": _load_json_file(path)})
    try:
        return datasets.load_dataset(builder, data_files={"train": str(path)})
    except Exception as error:  # pyarrow's messages name neither the file nor what to do
        raise ValueError(f"{path} could not be read as {builder}: {_last_line(error)}. Check that the file is complete.") from error


def _load_json_file(path: Path) -> datasets.Dataset:
    """A JSON / JSON Lines file through `datasets`, once its rows passed `check_records`."""
    check_records(_numbered_json_records(path), source=str(path))
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as error:  # e.g. another column whose type changes between rows
        raise ValueError(
            f"{path} could not be loaded by datasets: {_last_line(error)}. Every row must give each column the same type."
        ) from error


def read_json_records(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON Lines file (one object per line) or of a JSON file holding a list of objects.

    Raises:
        ValueError: naming the file and line, for an empty file, bytes that are not UTF-8, text that
            is not JSON, or a row that is not a JSON object.
    """
    return [record for _, record in _numbered_json_records(Path(path))]


def _numbered_json_records(path: Path) -> list[tuple[str, dict]]:
    """`(where, row)` pairs, `where` being "line N" (JSON Lines) or "row N" (a JSON list), for messages."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(
            f"{path}, line {line}: byte 0x{raw[error.start]:02x} at column {column} is not UTF-8. Save the file as UTF-8."
        ) from None
    text = text.removeprefix("\ufeff")  # the byte-order mark some editors write
    if not text.strip():
        raise ValueError(f"{path} is empty: it holds no rows. Write one JSON object per line (JSON Lines).")
    if text.lstrip().startswith("["):  # one JSON array of rows
        try:
            numbered = [(f"row {i}", record) for i, record in enumerate(json.loads(text))]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg}).") from None
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}). A JSON Lines file "
                    "holds one complete JSON object per line."
                ) from None
    if not numbered:
        raise ValueError(f"{path} holds no rows (an empty list).")
    for where, record in numbered:
        if not isinstance(record, dict):
            raise ValueError(f"{path}, {where}: expected a JSON object holding the row's fields, got {type(record).__name__}.")
    return numbered


def check_records(numbered: list[tuple[str, dict]], *, source: str) -> None:
    """Check raw rows before Arrow types them, naming the line and field of the first problem.

    Every row needs `chosen` and `rejected` (and `prompt` if the first row has one); each of these
    keeps one format across rows (strings, or lists of messages), and each value passes the checks
    of `check_preference_rows`.
    """
    fields = [name for name in ("prompt", "chosen", "rejected") if name in numbered[0][1] or name != "prompt"]
    first_kind: dict[str, str] = {}
    for where, record in numbered:
        for name in fields:
            if name not in record:
                raise ValueError(f"{source}, {where}: the row has no field {name!r}. {FORMAT_HELP}")
            problem, kind = _field_problem(record[name], required=name != "prompt")
            if problem:
                raise ValueError(f"{source}, {where}, field {name!r}: {problem}. {FORMAT_HELP}")
            first_kind.setdefault(name, kind)
            if kind != first_kind[name]:
                raise ValueError(
                    f"{source}, {where}, field {name!r}: {_KIND_NAMES[kind]} where the first row has "
                    f"{_KIND_NAMES[first_kind[name]]}; use one format for every row. {FORMAT_HELP}"
                )


_KIND_NAMES = {"standard": "a string", "conversational": "a list of messages"}


def _last_line(error: BaseException) -> str:
    """The innermost message of a chained exception, on one line."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return " ".join(str(error).split()) or type(error).__name__


def _select_split(splits: datasets.DatasetDict, split: str, *, source: str) -> datasets.Dataset:
    """Return ``splits[split]``, or raise ``ValueError`` listing the available splits."""
    if split not in splits:
        raise ValueError(
            f"Split {split!r} not found in dataset {source!r}; available splits: {sorted(splits)}. "
            "Pass one of these as split."
        )
    return splits[split]
