"""The sweep directory: atomic writes through pyarrow.fs, part files and their compaction.

`<storage>` is a local folder or any `pyarrow.fs` URI (file://, s3://, gs://). Every file is
written to a temporary name and then moved into place, so a killed writer never leaves a half
file under a final name.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "3"
PART_SUFFIX = ".parquet"


def resolve_storage(storage: str | Path) -> tuple[pafs.FileSystem, str, str]:
    """Return (filesystem, root path inside it, display URI) for a folder or a URI.

    Local folders become absolute paths, because Ray Tune runs trials in other working directories.
    """
    text = str(storage)
    if "://" in text:
        filesystem, root = pafs.FileSystem.from_uri(text)
        return filesystem, root.rstrip("/"), text.rstrip("/")
    root = str(Path(text).expanduser().resolve())
    return pafs.LocalFileSystem(), root, root


class SweepStore:
    """Reads and writes one sweep's directory `<storage>/<name>`."""

    def __init__(self, storage: str | Path, name: str):
        self.filesystem, root, display = resolve_storage(storage)
        self.root = f"{root}/{name}"
        self.uri = f"{display}/{name}"
        self.storage = display
        self.name = name

    @classmethod
    def from_sweep_dir(cls, sweep_dir: str | Path) -> "SweepStore":
        text = str(sweep_dir).rstrip("/")
        parent, _, name = text.rpartition("/")
        return cls(parent or ".", name)

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def exists(self, relative: str = "") -> bool:
        target = self.path(relative) if relative else self.root
        return self.filesystem.get_file_info(target).type != pafs.FileType.NotFound

    def makedirs(self, relative: str = "") -> None:
        self.filesystem.create_dir(self.path(relative) if relative else self.root, recursive=True)

    # -- atomic writes ----------------------------------------------------------------------------

    def write_bytes(self, relative: str, data: bytes) -> None:
        final = self.path(relative)
        self.filesystem.create_dir(final.rpartition("/")[0], recursive=True)
        temporary = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with self.filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        self.filesystem.move(temporary, final)

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode("utf-8"))

    def write_json(self, relative: str, data: Any) -> None:
        self.write_text(relative, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")

    def write_table(self, relative: str, table: pa.Table, metadata: dict[str, str] | None = None) -> None:
        """Write a Parquet file atomically, with optional key-value metadata."""
        if metadata:
            merged = dict(table.schema.metadata or {})
            merged.update({k.encode(): v.encode() for k, v in metadata.items()})
            table = table.replace_schema_metadata(merged)
        final = self.path(relative)
        self.filesystem.create_dir(final.rpartition("/")[0], recursive=True)
        temporary = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        pq.write_table(table, temporary, filesystem=self.filesystem, compression="zstd")
        self.filesystem.move(temporary, final)

    # -- reads ----------------------------------------------------------------------------------

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def read_bytes(self, relative: str) -> bytes:
        with self.filesystem.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def read_json(self, relative: str) -> Any:
        return json.loads(self.read_text(relative))

    def read_table(self, relative: str) -> pa.Table:
        return pq.read_table(self.path(relative), filesystem=self.filesystem)

    def list_parts(self) -> list[str]:
        """Return the chunk ids whose part file is complete (temporary files are ignored)."""
        selector = pafs.FileSelector(self.path("parts"), allow_not_found=True)
        names = [info.base_name for info in self.filesystem.get_file_info(selector) if info.type == pafs.FileType.File]
        return sorted(name[: -len(PART_SUFFIX)] for name in names if name.endswith(PART_SUFFIX))

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by killed writers; returns how many."""
        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        stale = [info.path for info in self.filesystem.get_file_info(selector) if ".tmp-" in info.base_name and "/ray/" not in info.path]
        for path in stale:
            self.filesystem.delete_file(path)
        return len(stale)

    def local_path(self, relative: str = "") -> Path:
        """Return the local path of a file; raises ValueError for remote storage."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on the local filesystem")
        return Path(self.path(relative) if relative else self.root)


def part_name(chunk_id: str) -> str:
    return f"parts/{chunk_id}{PART_SUFFIX}"


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
