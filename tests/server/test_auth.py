"""API keys and tenants: without a valid key every route but /health is a 401 in OpenAI's error shape; a
tenant's requests carry its cache salt (and a user's, with --kv-isolate-users), so tenants share no cached
block; the keys file's mistakes are errors naming the line, never the key; the tiers' metrics are served."""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.server.conftest import MODEL, PROMPT, LiveServer
from tokenforge.config import ConfigError
from tokenforge.engine.async_engine import AsyncLLMEngine
from tokenforge.kv.block_hash import compose_salt
from tokenforge.server.api import build_app
from tokenforge.server.auth import APIKeys, parse_keys_file

pytestmark = pytest.mark.timeout(60)

ALICE, BOB, ADMIN = "sk-alice-0123456789", "sk-bob-9876543210", "sk-admin-single"
BODY = {"model": MODEL, "prompt": PROMPT * 4, "max_tokens": 2, "temperature": 0}


class SaltRecorder:
    """An engine client that records each request's cache salt and passes it on."""

    def __init__(self, engine: AsyncLLMEngine):
        self.engine = engine
        self.salts: list[str | None] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, *args, cache_salt=None, **kwargs):
        self.salts.append(cache_salt)
        return self.engine.generate(*args, cache_salt=cache_salt, **kwargs)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# tenants\n{ALICE} alice 1MiB\n\n{BOB} bob\n")
    return path


@pytest.fixture(scope="module")
def secured(llama_dir, keys_file):
    keys = APIKeys.from_args(ADMIN, str(keys_file))
    engine = AsyncLLMEngine.from_args(str(llama_dir), kv_cache_memory="16MiB", num_threads=1,
                                      kv_offload_memory="4MiB", kv_tenant_quotas=keys.quotas())
    recorder = SaltRecorder(engine)
    with LiveServer(build_app(recorder, MODEL, api_keys=keys, isolate_users=True)) as server:
        yield server, recorder


def _post(url: str, key: str | None, path: str = "/v1/completions", body: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(f"{url}{path}", json=body or BODY, headers=headers, timeout=30)


@pytest.mark.parametrize("key", [None, "sk-wrong", ALICE[:-1], ALICE + "x"])
def test_every_route_but_health_needs_a_valid_key(secured, key):
    server, _ = secured
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    responses = [httpx.get(f"{server.url}{path}", headers=headers, timeout=10)
                 for path in ("/v1/models", "/metrics", "/v1/no-such-route")]
    responses += [_post(server.url, key), _post(server.url, key, "/v1/chat/completions",
                                                {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})]
    for response in responses:
        assert response.status_code == 401, response.url
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
        assert not key or key not in response.text  # never echoed
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_tenants_carry_their_salt_and_share_no_block(secured):
    server, recorder = secured
    recorder.salts.clear()
    stats = recorder.engine.stats
    assert _post(server.url, ALICE).status_code == 200
    hits = stats()["prefix_cache_hits"]
    assert _post(server.url, ALICE).status_code == 200
    assert stats()["prefix_cache_hits"] > hits  # the same tenant shares its own blocks
    hits = stats()["prefix_cache_hits"]
    assert _post(server.url, BOB).status_code == 200
    assert stats()["prefix_cache_hits"] == hits  # another tenant finds none of them
    assert _post(server.url, ADMIN, body={**BODY, "user": "carol", "cache_salt": "mine"}).status_code == 200
    assert _post(server.url, BOB, body={**BODY, "user": "dave"}).status_code == 200
    assert recorder.salts == ["tenant:alice", "tenant:alice", "tenant:bob", compose_salt("user:carol", "mine"),
                              compose_salt("tenant:bob", "user:dave")]


def test_metrics_behind_the_key_show_the_tiers(secured):
    server, _ = secured
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {BOB}"}, timeout=10).text
    for name in ("tokenforge_kv_tier_hits_total{tier=\"2\"}", "tokenforge_kv_tier_misses_total{tier=\"3\"}",
                 "tokenforge_kv_tier_blocks{tier=\"1\"}", "tokenforge_kv_tier_bytes_written_total{tier=\"2\"}",
                 "tokenforge_kv_tier_load_latency_seconds_bucket{le=\"+Inf\",tier=\"2\"}",
                 "tokenforge_kv_tier_load_bandwidth_bytes_per_second{tier=\"3\"}"):
        assert name in text, name
    assert 'tokenforge_requests_total{endpoint="/metrics",status_code="401"}' in text  # 401s are counted


def test_keys_file_errors_name_the_line_but_never_the_key(tmp_path, caplog):
    path = tmp_path / "keys"
    path.write_text(f"{ALICE} alice\n{ALICE} again\n")
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError, match="line 2") as error:
        parse_keys_file(str(path))
    assert ALICE not in str(error.value) and ALICE not in caplog.text
    path.write_text(f"{ALICE} alice\n{BOB} alice\n")
    with pytest.raises(ConfigError, match="alice.*used twice"):
        parse_keys_file(str(path))
    path.write_text("k1 a 1GiB extra\n")
    with pytest.raises(ConfigError, match="line 1: expected KEY"):
        parse_keys_file(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        parse_keys_file(str(tmp_path / "missing"))
    tenants = parse_keys_file(str(_write(tmp_path, "k1\nk2 team 2GiB\n")))
    assert tenants["k2"].quota == 2 << 30 and tenants["k2"].salt == "tenant:team"
    assert tenants["k1"].name.startswith("key-") and "k1" not in tenants["k1"].name


def _write(folder, text):
    path = folder / "k"
    path.write_text(text)
    return path
