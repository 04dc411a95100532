"""Files written so that nothing half-written is ever read, and checked before they are used.

- `atomic_write`: readers (and a run after `kill -9`) see the old file or the new one, never a part.
- `sha256_file` / `FileDigests`: content checksums; a checksum memo keyed by (path, size, mtime) so a
  large checkpoint is hashed once, and again only when the file is rewritten.
- `Manifest`: a folder's files with their checksums, written last, so a folder counts as complete and
  intact only when every file it lists still has its checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def atomic_write(path: str | os.PathLike, payload: bytes) -> None:
    """Write `payload` to `path` all at once: readers (and a run after `kill -9`) see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike | None) -> dict:
    """A JSON object from `path`, or `{}` if the file is missing, unreadable or not a JSON object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


class FileDigests:
    """sha256 of files by content, memoized in a JSON file by (resolved path, inode, size, mtime, ctime).

    A file rewritten or replaced is hashed again, even by a copy that keeps the old size and mtime
    (`cp -p`, `rsync -a`, unpacking an archive): its inode or ctime, which no copy sets, moves. A
    damaged memo reads as empty, so the worst it costs is hashing again.
    """

    def __init__(self, memo_path: str | os.PathLike | None):
        self.memo_path = Path(memo_path) if memo_path else None
        self.memo = read_json(self.memo_path) if self.memo_path else {}
        self._changed = False

    def __call__(self, path: str | os.PathLike) -> str:
        path = Path(path)
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
        if key not in self.memo:
            self.memo[key] = sha256_file(path)
            self._changed = True
        return self.memo[key]

    def save(self) -> None:
        if self.memo_path and self._changed:
            atomic_write(self.memo_path, json.dumps(self.memo, indent=0).encode())
            self._changed = False


MANIFEST_NAME = "selective_po_manifest.json"


def write_manifest(folder: str | os.PathLike, digests: FileDigests, **fields) -> None:
    """List every file under `folder` with its size and checksum (plus `fields`), written last."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    listing = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": digests(p)} for p in files}
    digests.save()
    atomic_write(folder / MANIFEST_NAME, json.dumps({**fields, "files": listing}, indent=1).encode())


def manifest_problem(folder: str | os.PathLike, digests: FileDigests) -> str | None:
    """Why `folder` cannot be trusted: `None` if every file its manifest lists is intact, `""` if it does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return ""
    listing = read_json(folder / MANIFEST_NAME).get("files")
    if not isinstance(listing, dict) or not listing:
        return f"{folder / MANIFEST_NAME} is missing or damaged"
    for name, meta in listing.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if not isinstance(meta, dict) or path.stat().st_size != meta.get("bytes") or digests(path) != meta.get("sha256"):
            return f"{path} does not match its checksum in {MANIFEST_NAME} (changed or cut short)"
    digests.save()
    return None
