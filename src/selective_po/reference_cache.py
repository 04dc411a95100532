"""Per-token reference log-probs, computed once per dataset and stored on disk.

TRL's `precompute_ref_log_probs` stores one summed log-prob per sequence, which token selection
cannot use: it needs the reference's log-prob of every response token. This module stores exactly
that, aligned with the trainer's own batches: scoring runs TRL's tokenized dataset through TRL's
collator (same tokenization, truncation and masks), so the `i`-th stored value of a response is the
reference log-prob at the `i`-th position of that response's shifted completion mask in training.

Layout of one cache entry, `<root>/<key>/`:

    key.json                what the key was made of (for people; the directory name is its hash)
    shard-00000.parquet     rows [0, shard_size): columns row, chosen, rejected (list<float32>)
    shard-00000.json        entry key, rows, token count and sha256 of the parquet file, written after it

A shard counts only when its manifest exists and its file matches the manifest's checksum, so an
interrupted run (even `kill -9`) leaves at most one partial file that is detected and recomputed;
completed shards are never computed twice. Values are read straight from the Parquet bytes whose
checksum was just verified, never from a copy: a shard edited, cut short or deleted after it was
written is reported in one line and scored again, and a damaged or missing `key.json` is rewritten
when the shards' manifests show they belong to this entry. The key hashes everything that changes the values:
the token ids of the dataset, the tokenizer, the reference's weights, `max_length`, the truncation
mode and the compute dtype. Any change gives a new entry; nothing stale is reused. Files moved by hand
between entries are caught too: `key.json` and every manifest must match the entry they sit in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets import Dataset, concatenate_datasets
from datasets.table import InMemoryTable

from .files import FileDigests, atomic_write, read_json, sha256_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: shard manifests carry their entry's key
CHOSEN_COLUMN = "ref_chosen_token_logps"
REJECTED_COLUMN = "ref_rejected_token_logps"
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


# ---------------------------------------------------------------------------------------------
# What the key is made of


def token_content_hash(dataset: Dataset) -> str:
    """sha256 of the tokenized dataset's token ids (prompt, chosen, rejected), in row order."""
    missing = [name for name in TOKEN_COLUMNS if name not in dataset.column_names]
    if missing:
        raise ValueError(f"Dataset is not tokenized by the trainer: columns {missing} are missing.")
    digest = hashlib.sha256()
    table = dataset.with_format("arrow").select_columns(list(TOKEN_COLUMNS))
    for batch in table.iter(batch_size=4096):
        for name in TOKEN_COLUMNS:
            column = pa.chunked_array(batch[name]).combine_chunks()
            offsets = np.asarray(column.offsets, dtype=np.int64)
            digest.update(name.encode())
            digest.update((offsets - offsets[0]).tobytes())
            digest.update(np.asarray(column.values.to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides token ids: the vocabulary and merges, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(spec.encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return digest.hexdigest()


def files_weights_hash(folder: str | os.PathLike, *, memo_path: Path | None = None) -> str:
    """sha256 over the config and weight files of a local checkpoint folder, by content.

    Hashing a large checkpoint takes a while, so each file's digest is memoized by (path, size,
    mtime): a file rewritten in place gets a new mtime and is hashed again.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"No weight files ({', '.join(WEIGHT_SUFFIXES)}) under {folder} to identify the reference by.")
    file_digest = FileDigests(memo_path)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder)}:{file_digest(path)}".encode())
    file_digest.save()
    return digest.hexdigest()


def cache_key(components: dict) -> str:
    """Directory name of a cache entry: a hash of every component, in a fixed order."""
    payload = json.dumps({"format": FORMAT_VERSION, **components}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Storage


@dataclass(frozen=True)
class ShardSpec:
    index: int
    start: int
    stop: int


class ReferenceLogpsStore:
    """One cache entry: `n_rows` rows of per-token values, in shards of `shard_size` rows.

    The values are a frozen model's per-token log-probs (Selective-DPO's reference) or anything
    computed from such models per token (SePO's oracle rewards); `columns` names the chosen and
    rejected columns.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        components: dict,
        *,
        n_rows: int,
        shard_size: int,
        columns: tuple[str, str] = (CHOSEN_COLUMN, REJECTED_COLUMN),
        report: Callable[[str], None] | None = None,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}.")
        self.columns = columns
        self.components = {**components, "rows": n_rows, "columns": list(columns)}
        self.key = cache_key(self.components)
        self.path = Path(root) / self.key
        self.n_rows = n_rows
        self.shard_size = shard_size
        self.report = report or logger.warning  # one line per damaged file found

    def shards(self) -> list[ShardSpec]:
        return [
            ShardSpec(i, start, min(start + self.shard_size, self.n_rows))
            for i, start in enumerate(range(0, self.n_rows, self.shard_size))
        ]

    def _files(self, shard: ShardSpec) -> tuple[Path, Path]:
        return self.path / f"shard-{shard.index:05d}.parquet", self.path / f"shard-{shard.index:05d}.json"

    def check_identity(self) -> None:
        """Raise if this folder holds values made for other inputs (copied or renamed from another entry).

        The folder's name is the hash of this run's inputs, so a `key.json` that describes other inputs
        while the shard manifests carry another entry's key means files were moved by hand; using them
        would train against another model's or dataset's values. A `key.json` that is missing, unreadable
        or edited while the manifests carry this entry's key is damage: reported and written again.
        """
        key_file = self.path / "key.json"
        if not self.path.is_dir():
            return
        stored, expected = read_json(key_file), json.loads(json.dumps(self.components))  # compare as JSON
        if stored == expected:
            return
        foreign = [m for m in sorted(self.path.glob("shard-*.json")) if read_json(m).get("key", self.key) != self.key]
        if foreign and stored:
            differing = sorted(k for k in stored.keys() | expected.keys() if stored.get(k) != expected.get(k))
            details = "; ".join(f"{k}: stored {stored.get(k)!r}, this run {expected.get(k)!r}" for k in differing)
            raise ValueError(
                f"{key_file} says the values in {self.path} were made for other inputs ({details}). The folder was "
                f"copied or renamed from another cache entry. Delete {self.path} to score the values for this run."
            )
        if foreign:
            raise ValueError(
                f"{foreign[0]} belongs to another cache entry (field 'key' is {read_json(foreign[0]).get('key')!r}, "
                f"this entry is {self.key!r}). Delete {self.path} to score the values for this run."
            )
        if key_file.exists() or any(self.path.glob("shard-*")):
            state = "is damaged" if key_file.exists() else "is missing"
            self.report(f"{key_file} {state}; the shards' manifests name this entry, so it is written again.")
            atomic_write(key_file, json.dumps(self.components, indent=2, sort_keys=True).encode())

    def shard_problem(self, shard: ShardSpec) -> str | None:
        """Why a shard cannot be used: `None` if complete and intact, `""` if never written, else the damage."""
        data, manifest = self._files(shard)
        if not manifest.is_file():
            return f"{data.name} has no {manifest.name}: it was cut off while being written, or that was deleted" if data.is_file() else ""
        meta = read_json(manifest)
        if meta.get("key", self.key) != self.key:  # an intact shard of another entry, copied in
            raise ValueError(
                f"{manifest} belongs to another cache entry (field 'key' is {meta.get('key')!r}, this entry is "
                f"{self.key!r}). Delete {self.path} to score the values for this run."
            )
        if not meta or meta.get("start") != shard.start or meta.get("stop") != shard.stop:
            return f"{manifest.name} is damaged"
        if not data.is_file():
            return f"{data.name} is missing"
        if meta.get("sha256") != sha256_file(data):
            return f"{data.name} does not match the checksum in {manifest.name} (changed or cut short after it was written)"
        return None

    def is_valid(self, shard: ShardSpec) -> bool:
        """Whether a shard is complete and intact (manifest present, checksum and row range match)."""
        return self.shard_problem(shard) is None

    def missing_shards(self) -> list[ShardSpec]:
        """Shards to score: never written, or damaged (each damaged one reported in one line)."""
        self.check_identity()
        missing = []
        for shard in self.shards():
            problem = self.shard_problem(shard)
            if problem:
                self.report(f"Stored values in {self.path}: {problem}; scoring rows {shard.start}-{shard.stop - 1} again.")
            if problem is not None:
                missing.append(shard)
        return missing

    def write_shard(self, shard: ShardSpec, chosen: list[np.ndarray], rejected: list[np.ndarray]) -> None:
        """Write one shard: data first, then its manifest, each through an atomic rename."""
        if len(chosen) != shard.stop - shard.start or len(rejected) != len(chosen):
            raise ValueError(f"Shard {shard.index} expects {shard.stop - shard.start} rows, got {len(chosen)}.")
        for values in (*chosen, *rejected):
            if not np.isfinite(values).all():
                raise ValueError(f"Non-finite per-token value in rows {shard.start}-{shard.stop - 1}; not stored.")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / "key.json", json.dumps(self.components, indent=2, sort_keys=True).encode())
        data, manifest = self._files(shard)
        float_list = pa.list_(pa.float32())
        table = pa.table(
            {
                "row": pa.array(range(shard.start, shard.stop), pa.int64()),
                self.columns[0]: pa.array([v.astype(np.float32) for v in chosen], float_list),
                self.columns[1]: pa.array([v.astype(np.float32) for v in rejected], float_list),
            }
        )
        manifest.unlink(missing_ok=True)  # the old manifest must not vouch for the new file
        tmp = data.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, data)
        meta = {
            "key": self.key,
            "start": shard.start,
            "stop": shard.stop,
            "tokens": int(sum(len(v) for v in (*chosen, *rejected))),
            "sha256": sha256_file(data),
        }
        atomic_write(manifest, json.dumps(meta).encode())

    def load(self) -> Dataset:
        """All shards as one in-memory `Dataset` with the two per-token columns, in row order.

        Each shard is parsed from the very bytes whose checksum is verified here, so what training
        reads is what was written; nothing is read from a derived copy.
        """
        # Earlier versions kept a derived Arrow copy here, which later runs read unchecked.
        shutil.rmtree(self.path / "arrow", ignore_errors=True)
        tables = []
        for shard in self.shards():
            data, manifest = self._files(shard)
            payload = data.read_bytes() if data.is_file() else b""
            if hashlib.sha256(payload).hexdigest() != read_json(manifest).get("sha256"):
                raise RuntimeError(
                    f"{data} changed while this run was using the cache (its checksum no longer matches "
                    f"{manifest.name}). Run again: damaged shards are scored anew."
                )
            tables.append(pq.read_table(pa.BufferReader(payload)))
        table = pa.concat_tables(tables)
        if table.column("row").to_pylist() != list(range(self.n_rows)):
            raise RuntimeError(f"Reference cache {self.path} has rows out of order; delete the folder.")
        loaded = Dataset(InMemoryTable(table.drop_columns(["row"])))
        self._check_finite(loaded)
        return loaded

    def _check_finite(self, loaded: Dataset) -> None:
        """Raise if a stored value is NaN or inf.

        Writing refuses non-finite values, but a checksum only vouches for the bytes: a shard edited on
        disk with its manifest rewritten would otherwise feed NaN into selection and the loss.
        """
        for column in self.columns:
            if pc.all(pc.is_finite(pc.list_flatten(loaded.data.column(column)))).as_py() is not False:
                continue
            # Rare path: find the first offending row and token for the message.
            row, values = next((i, v) for i, v in enumerate(loaded[column]) if not np.isfinite(v).all())
            token = int(np.flatnonzero(~np.isfinite(values))[0])
            shard = self._files(self.shards()[row // self.shard_size])[0]
            raise ValueError(
                f"Stored value {values[token]} in {shard}, row {row} (dataset index), column {column!r}, token "
                f"{token} is not finite. The file was changed after it was written. Delete {self.path} (or that "
                "shard and its .json manifest) to score the values again."
            )


# ---------------------------------------------------------------------------------------------
# Scoring


RowScorer = Callable[[list[dict]], tuple[list[np.ndarray], list[np.ndarray]]]


def collated_scorer(
    collator: Callable[[list[dict]], dict], forward: Callable[[dict], tuple[torch.Tensor, torch.Tensor]]
) -> RowScorer:
    """Score rows through TRL's collator: the values at the positions of its shifted completion mask.

    Args:
        collator: TRL's preference collator; its masks define which positions are stored.
        forward: `batch -> (values, completion_mask)`, both `(2B, T-1)`.
    """

    def score_rows(rows: list[dict]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        values, mask = forward(collator(rows))
        per_row = [row_values[row_mask].float().cpu().numpy() for row_values, row_mask in zip(values, mask)]
        half = len(per_row) // 2  # the collator stacks [chosen; rejected]
        return per_row[:half], per_row[half:]

    return score_rows


def attach_reference_logps(dataset: Dataset, store: ReferenceLogpsStore) -> Dataset:
    """The dataset with the stored per-token columns added (row `i` gets stored row `i`)."""
    stored = store.load()
    if len(stored) != len(dataset):
        raise RuntimeError(f"Reference cache {store.path} has {len(stored)} rows, the dataset {len(dataset)}.")
    existing = [c for c in store.columns if c in dataset.column_names]
    return concatenate_datasets([dataset.remove_columns(existing), stored], axis=1)


# ---------------------------------------------------------------------------------------------
# Collation


class PerTokenReferenceCollator:
    """Wraps TRL's preference collator: adds `output_key`, `(2B, T-1)`, from stored per-token values.

    Values are placed at the positions of the shifted completion mask, row by row, in order; a row
    whose stored length differs from its number of completion positions means the cache does not
    belong to these tokens, and is an error.
    """

    def __init__(
        self,
        inner: Callable[[list[dict]], dict],
        *,
        columns: tuple[str, str] = (CHOSEN_COLUMN, REJECTED_COLUMN),
        output_key: str = "ref_per_token_logps",
    ):
        self.inner = inner
        self.columns = columns
        self.output_key = output_key

    def __call__(self, examples: list[dict]) -> dict:
        chosen_column, rejected_column = self.columns
        missing = [c for c in self.columns if c not in examples[0]]
        if missing:
            raise ValueError(
                f"The batch has no stored per-token values (columns {missing}). With "
                "precompute_ref_log_probs=True they are added when the trainer is built; for a dataset prepared "
                "elsewhere run `selective-po score` with the same settings, or set precompute_ref_log_probs=False."
            )
        batch = self.inner(examples)
        mask = batch["completion_mask"][:, 1:].bool()  # (2B, T-1)
        rows = [e[chosen_column] for e in examples] + [e[rejected_column] for e in examples]
        lengths = torch.tensor([len(r) for r in rows])
        expected = mask.sum(dim=1)
        if not torch.equal(lengths, expected):
            bad = int((lengths != expected).nonzero()[0])
            raise ValueError(
                f"Stored per-token values do not match the tokens: row {bad % len(examples)} of the batch "
                f"({'chosen' if bad < len(examples) else 'rejected'}) has {int(lengths[bad])} stored values for "
                f"{int(expected[bad])} completion tokens. The cache was made for other tokens or another max_length; "
                "delete it or rescore."
            )
        values = np.concatenate([np.asarray(r, dtype=np.float32) for r in rows])
        if not np.isfinite(values).all():  # values from a dataset prepared elsewhere reach the loss here
            bad = next(i for i, r in enumerate(rows) if not np.isfinite(np.asarray(r, dtype=np.float32)).all())
            column = chosen_column if bad < len(examples) else rejected_column
            raise ValueError(
                f"Stored per-token values are not finite: row {bad % len(examples)} of the batch, column {column!r}. "
                "Rescore them (`selective-po score`, or delete the cache folder) instead of training on NaN or inf."
            )
        values = torch.from_numpy(values)
        batch[self.output_key] = torch.zeros(mask.shape).masked_scatter_(mask, values)
        return batch
