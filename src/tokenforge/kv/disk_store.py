"""The disk tier's files (L3): one block per file under `DIR/<namespace>/<xx>/<key>.kvb`, written crash-safe,
checked on every read, and listed at start-up so a restarted engine finds what the last one wrote.

Writes go to a temporary file that is renamed into place, so a reader (or a restart after a crash) sees a
whole file or none; data is not fsynced, since a file a power loss cut short fails its checksum
(`block_file`) and is then recomputed like any other bad file. A file that fails a check is deleted and
reported missing, never used. This class only does synchronous I/O on bytes; the runner's offloader calls
it from its own threads and the scheduler's index (`kv/tiers.py`) decides what to write, read and delete.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from tokenforge.kv.block_file import (
    HEADER_SIZE,
    BlockFileError,
    check_header,
    check_payload,
    decode_header,
    encode_header,
)

logger = logging.getLogger(__name__)

SUFFIX = ".kvb"


@dataclass(frozen=True)
class DiskEntry:
    """A good block file found at start-up."""

    key: bytes
    owner: bytes
    mtime: float  # the last write or load: start-up order for LRU


class DiskStore:
    def __init__(self, root: str | os.PathLike, namespace: bytes, payload_bytes: int):
        self.namespace = namespace
        self.payload_bytes = payload_bytes
        self.file_bytes = HEADER_SIZE + payload_bytes
        self.dir = Path(root) / namespace.hex()[:16]
        self.problem = self._probe()  # None when usable, otherwise why not (warned once, here)
        self.num_rejected = 0  # files found bad (corrupt, truncated, foreign) and removed or skipped

    @property
    def usable(self) -> bool:
        return self.problem is None

    def _probe(self) -> str | None:
        """Create the folder and write, rename and delete a probe file: a directory that cannot take files
        is found now, with one warning, rather than on every block."""
        probe = self.dir / f".probe-{uuid.uuid4().hex}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe.with_suffix(".tmp").write_bytes(b"probe")
            os.replace(probe.with_suffix(".tmp"), probe)
            probe.unlink()
        except OSError as e:
            problem = f"{self.dir}: {e.strerror or e}"
            logger.warning("KV disk tier disabled, continuing with host memory only: cannot write to %s", problem)
            return problem
        return None

    def path(self, key: bytes) -> Path:
        name = key.hex()
        return self.dir / name[:2] / (name + SUFFIX)

    def scan(self) -> list[DiskEntry]:
        """Every good block file of this namespace, oldest first. Leftover temporary files (a crash mid-write)
        and files that fail their header checks are removed; payloads are checked when read."""
        if not self.usable:
            return []
        entries = []
        for path in self.dir.glob("*/*"):
            if path.suffix != SUFFIX:
                _remove(path)
                continue
            entry = self._entry(path)
            if entry is None:
                self.num_rejected += 1
                _remove(path)
            else:
                entries.append(entry)
        entries.sort(key=lambda e: e.mtime)
        return entries

    def _entry(self, path: Path) -> DiskEntry | None:
        try:
            with open(path, "rb") as f:
                header = decode_header(f.read(HEADER_SIZE))
                size = os.fstat(f.fileno()).st_size
            key = bytes.fromhex(path.stem)
            check_header(header, self.namespace, key, self.payload_bytes)
            if size != self.file_bytes:
                raise BlockFileError(f"{size} bytes, expected {self.file_bytes}")
            return DiskEntry(key, header.owner, path.stat().st_mtime)
        except (OSError, ValueError) as e:
            logger.info("KV disk tier: ignoring %s: %s", path.name, e)
            return None

    def write(self, key: bytes, owner: bytes, payload) -> None:
        """Write one block crash-safe; raises OSError (a full disk, a vanished folder) for the caller."""
        path = self.path(key)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        header = encode_header(self.namespace, key, owner, payload)
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
            os.replace(tmp, path)
        except OSError:
            _remove(tmp)
            raise

    def read(self, key: bytes, out: memoryview | None = None) -> memoryview | None:
        """The block's payload (read into `out` when given: a reused buffer of exactly the payload's size),
        or None when the file is missing or bad (then it is removed)."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                header = decode_header(f.read(HEADER_SIZE))
                check_header(header, self.namespace, key, self.payload_bytes)
                payload = out if out is not None else memoryview(bytearray(self.payload_bytes))
                num_read = f.readinto(payload)
                if f.read(1):
                    raise BlockFileError("longer than its header says")
            check_payload(header, payload[:num_read])
        except FileNotFoundError:
            return None
        except (OSError, BlockFileError) as e:
            logger.warning("KV disk tier: %s is unusable (%s); recomputing it", path.name, e)
            self.num_rejected += 1
            _remove(path)
            return None
        try:
            os.utime(path)  # a load makes the block recently used, also for the next start-up's order
        except OSError:
            pass
        return payload

    def delete(self, key: bytes) -> None:
        _remove(self.path(key))


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # already gone, or on a read-only disk: either way it is never used
