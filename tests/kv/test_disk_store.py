"""The disk tier's files: round trips, every kind of damage detected (and the file removed), start-up listing,
and a folder that cannot be written to disabling the tier with one warning."""

import logging
import os

import pytest

from tokenforge.kv.block_file import HEADER_SIZE
from tokenforge.kv.block_hash import kv_namespace
from tokenforge.kv.disk_store import DiskStore

NS = kv_namespace("model-a", "torch.float32", 16)
PAYLOAD = bytes(range(256)) * 4


def _key(i: int) -> bytes:
    return bytes([i]) * 32


@pytest.fixture
def store(tmp_path) -> DiskStore:
    return DiskStore(tmp_path, NS, len(PAYLOAD))


def test_round_trip_and_restart_listing(store, tmp_path):
    store.write(_key(1), b"o" * 16, PAYLOAD)
    store.write(_key(2), b"p" * 16, PAYLOAD)
    assert bytes(store.read(_key(1))) == PAYLOAD
    os.utime(store.path(_key(2)), (1, 1))  # older than key 1
    again = DiskStore(tmp_path, NS, len(PAYLOAD))
    entries = again.scan()
    assert [(e.key, e.owner) for e in entries] == [(_key(2), b"p" * 16), (_key(1), b"o" * 16)]
    assert store.read(_key(3)) is None  # never written
    store.delete(_key(1))
    assert store.read(_key(1)) is None


@pytest.mark.parametrize("damage", ["flip-payload", "flip-header", "truncate", "empty", "foreign", "renamed"])
def test_damaged_files_are_detected_never_used_and_removed(store, tmp_path, damage):
    store.write(_key(1), bytes(16), PAYLOAD)
    path = store.path(_key(1))
    data = bytearray(path.read_bytes())
    if damage == "flip-payload":
        data[HEADER_SIZE + 100] ^= 0x40
    elif damage == "flip-header":
        data[20] ^= 0x01
    elif damage == "truncate":
        data = data[:-10]
    elif damage == "empty":
        data = bytearray()
    elif damage == "foreign":  # another model's block, put where ours would be
        other = DiskStore(tmp_path / "other", kv_namespace("model-b", "torch.float32", 16), len(PAYLOAD))
        other.write(_key(1), bytes(16), PAYLOAD)
        data = bytearray(other.path(_key(1)).read_bytes())
    elif damage == "renamed":  # a good file of ours under another key's name
        store.write(_key(2), bytes(16), PAYLOAD)
        data = bytearray(store.path(_key(2)).read_bytes())
    path.write_bytes(bytes(data))
    if damage != "flip-payload":  # the header checks catch it at start-up already
        assert _key(1) not in [e.key for e in DiskStore(tmp_path, NS, len(PAYLOAD)).scan()]
        path.write_bytes(bytes(data))
    assert store.read(_key(1)) is None
    assert not path.exists() and store.num_rejected >= 1


def test_start_up_removes_leftover_temporary_files(store):
    store.write(_key(1), bytes(16), PAYLOAD)
    leftover = store.path(_key(1)).with_name("crashed.kvb.1234.tmp")
    leftover.write_bytes(b"half a block")
    assert [e.key for e in store.scan()] == [_key(1)] and not leftover.exists()


def test_an_unwritable_folder_disables_the_tier_with_one_warning(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        store = DiskStore(blocker / "kv", NS, len(PAYLOAD))
    assert not store.usable and store.scan() == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "host memory only" in warnings[0].getMessage()
