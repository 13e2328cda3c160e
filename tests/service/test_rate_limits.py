"""Rate limits (api/ratelimit.py) and the stored bootstrap key (api.keys.store_bootstrap_key), on both
backends: the counters in Redis on production, in memory on the embedded default; nothing mocked.

Each test builds an app with only the limits it meets (small ones; the suite's own settings set limits no test
reaches) and sends from a client address of its own, so that no test counts another's requests."""

from __future__ import annotations

import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from httpx import Response
from limits.storage import MemoryStorage, RedisStorage
from pydantic import SecretStr
from sqlalchemy import func, select

from api.app import create_app
from api.config import Settings
from api.db import SessionFactory, make_session_factory
from api.ids import new_id
from api.keys import (
    BOOTSTRAP_KEY_NAME,
    DEFAULT_TENANT,
    KEY_PREFIX_CHARS,
    BootstrapKeyClash,
    find_key,
    key_sha256,
    revoke_key,
    store_bootstrap_key,
)
from api.schemas.common import ErrorPublic
from api.tables import ApiKey, Tenant
from tests.backends import REDIS_URL
from tests.service.service_calls import new_key

FILES = "/v1/files"
ESTIMATES = "/v1/estimates"
LIMITS = ("key", "tenant", "estimates", "failed_auth")


def limited_app(settings: Settings, **per_min: int) -> FastAPI:
    """An app with only the limits given (``key=3``: GT_RATE_LIMIT_KEY_PER_MIN=3), every other one off."""
    update = {f"rate_limit_{name}_per_min": per_min.get(name, 0) for name in LIMITS}
    return create_app(settings.model_copy(update=update))


def new_address() -> str:
    """A random client address (failed authentications are counted per address)."""
    return "10." + ".".join(str(secrets.randbelow(256)) for _ in range(3))


def client_at(app: FastAPI, address: str, key: str | None = None) -> TestClient:
    """A client of ``app`` at ``address`` that sends ``key`` (none: no Authorization header)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return TestClient(app, headers=headers, client=(address, 50000))


def assert_rate_limited(response: Response, setting: str) -> dict:
    """Check a 429 of the limit ``setting`` in OpenAI's shape with a Retry-After; returns the error."""
    assert response.status_code == 429, response.text
    retry_after_s = int(response.headers["retry-after"])
    assert 1 <= retry_after_s <= 60
    assert response.headers.get("x-should-retry") != "false"  # a retry after Retry-After succeeds
    error = ErrorPublic.model_validate(response.json()).error.model_dump()
    assert (error["type"], error["code"], error["param"]) == ("rate_limit_error", "rate_limit_exceeded", None)
    assert setting in error["message"] and response.json()["error"]["retry_after_s"] == retry_after_s
    return error


def test_a_key_past_its_limit_answers_429_and_other_tenants_go_on(settings: Settings, sessions) -> None:
    app = limited_app(settings, key=3)
    address = new_address()
    key, other = new_key(sessions), new_key(sessions)
    client = client_at(app, address, key)
    for _ in range(3):
        assert client.get(FILES).status_code == 200
    assert_rate_limited(client.get(FILES), "GT_RATE_LIMIT_KEY_PER_MIN")
    assert client_at(app, address, other).get(FILES).status_code == 200  # another tenant's key
    assert client.get("/health").status_code == 200  # never limited
    assert client.get("/").status_code == 200  # the dashboard's page
    # On production every API process counts in the same Redis: a second one refuses the key too.
    if not settings.embedded:
        assert_rate_limited(client_at(limited_app(settings, key=3), address, key).get(FILES), "KEY_PER_MIN")


def test_a_tenant_past_its_limit_answers_429_on_every_key(settings: Settings, sessions) -> None:
    app = limited_app(settings, tenant=4)
    tenant = f"tenant-{secrets.token_hex(4)}"
    first, second = (client_at(app, new_address(), new_key(sessions, tenant)) for _ in range(2))
    for client in (first, second, first, second):
        assert client.get(FILES).status_code == 200
    for client in (first, second):
        assert_rate_limited(client.get(FILES), "GT_RATE_LIMIT_TENANT_PER_MIN")
    assert client_at(app, new_address(), new_key(sessions)).get(FILES).status_code == 200


def test_estimates_have_a_limit_of_their_own(settings: Settings, sessions) -> None:
    app = limited_app(settings, estimates=2)
    client = client_at(app, new_address(), new_key(sessions))
    # A file that does not exist: counted all the same (before the body is looked at), and quick.
    body = {"model": "demo-tiny", "training_file": new_id("file"), "method": {"type": "green"}}
    for _ in range(2):
        assert client.post(ESTIMATES, json=body).status_code not in (200, 429)
    error = assert_rate_limited(client.post(ESTIMATES, json=body), "GT_RATE_LIMIT_ESTIMATES_PER_MIN")
    assert error["limit_per_min"] == 2
    assert client.get(FILES).status_code == 200  # other requests of the tenant go on
    other = client_at(app, new_address(), new_key(sessions))
    assert other.post(ESTIMATES, json=body).status_code != 429  # another tenant's estimates


def test_an_address_that_sent_wrong_keys_waits_even_with_the_right_one(settings: Settings, sessions) -> None:
    app = limited_app(settings, failed_auth=3)
    address = new_address()
    right = client_at(app, address, new_key(sessions))
    wrong = client_at(app, address, "gt-" + secrets.token_urlsafe(32))
    for _ in range(5):
        assert right.get(FILES).status_code == 200  # a successful authentication is not counted
    for _ in range(3):
        assert wrong.get(FILES).status_code == 401
    assert_rate_limited(right.get(FILES), "GT_RATE_LIMIT_FAILED_AUTH_PER_MIN")
    assert_rate_limited(wrong.get(FILES), "GT_RATE_LIMIT_FAILED_AUTH_PER_MIN")
    assert client_at(app, address).get(FILES).status_code == 401  # no key: nothing to guess with
    assert client_at(app, address).get("/health").status_code == 200
    assert client_at(app, new_address(), right.headers["authorization"][7:]).get(FILES).status_code == 200
    # The window passes (cleared here, rather than waited for): the address is served again.
    limits = app.state.rate_limits
    limits.limiter.clear(limits.failed_auth.item, address)
    assert right.get(FILES).status_code == 200


def test_uploads_with_wrong_keys_count_against_the_address(settings: Settings, sessions) -> None:
    # An upload's key is checked before the route runs (api.limits.BodyLimit): the same limit applies there.
    app = limited_app(settings, failed_auth=2)
    address = new_address()
    wrong = client_at(app, address, "gt-" + secrets.token_urlsafe(32))
    right = client_at(app, address, new_key(sessions))
    upload = {
        "files": {"file": ("t.jsonl", b'{"prompt": "a", "completion": "b"}\n')},
        "data": {"purpose": "fine-tune"},
    }
    for _ in range(2):
        assert wrong.post(FILES, **upload).status_code == 401
    assert_rate_limited(wrong.post(FILES, **upload), "GT_RATE_LIMIT_FAILED_AUTH_PER_MIN")
    assert_rate_limited(right.post(FILES, **upload), "GT_RATE_LIMIT_FAILED_AUTH_PER_MIN")
    assert_rate_limited(right.get(FILES), "GT_RATE_LIMIT_FAILED_AUTH_PER_MIN")  # every route, once limited
    assert (
        client_at(app, new_address(), right.headers["authorization"][7:]).post(FILES, **upload).status_code
        == 200
    )


def test_counters_live_in_redis_on_production_and_in_memory_on_embedded(settings: Settings, sessions) -> None:
    app = limited_app(settings, key=100)
    key = new_key(sessions)
    assert client_at(app, new_address(), key).get(FILES).status_code == 200
    storage = app.state.rate_limits.storage
    if settings.embedded:
        assert isinstance(storage, MemoryStorage)
        return
    assert isinstance(storage, RedisStorage)
    client = redis.Redis.from_url(REDIS_URL)
    names = [name.decode() for name in client.scan_iter(f"{settings.broker_prefix}ratelimit:*")]
    client.close()
    assert any(key[:KEY_PREFIX_CHARS] in name for name in names), names


def test_requests_pass_while_the_counters_storage_is_down(
    settings: Settings, sessions, caplog: pytest.LogCaptureFixture
) -> None:
    down = settings.model_copy(update={"rate_limit_storage_url": "redis://127.0.0.1:1/0"})  # nothing listens
    app = create_app(down.model_copy(update={"rate_limit_key_per_min": 1}))
    client = client_at(app, new_address(), new_key(sessions))
    with caplog.at_level(logging.WARNING, logger="api.ratelimit"):
        assert [client.get(FILES).status_code for _ in range(3)] == [200] * 3
    assert "rate limits are off" in caplog.text


def test_the_storage_is_the_brokers_redis_unless_set() -> None:
    assert Settings(broker_url="redis://r:6379/0").rate_limit_storage_url == "redis://r:6379/0"
    assert Settings(broker_url="rediss://:pw@r:6380/1").rate_limit_storage_url == "rediss://:pw@r:6380/1"
    assert Settings().rate_limit_storage_url == "memory://"  # the embedded broker is no Redis
    own = Settings(broker_url="redis://r:6379/0", rate_limit_storage_url="redis://other:6379/2")
    assert own.rate_limit_storage_url == "redis://other:6379/2"
    with pytest.raises(ValueError, match="GT_RATE_LIMIT_STORAGE_URL"):
        Settings(rate_limit_storage_url="memcached://m:11211")


def test_the_openai_client_sees_a_rate_limit_error(settings: Settings, sessions) -> None:
    app = limited_app(settings, key=2)
    http = TestClient(app, client=(new_address(), 50000))
    client = openai.OpenAI(api_key=new_key(sessions), base_url="http://testserver/v1", http_client=http)
    client = client.with_options(max_retries=0)
    for _ in range(2):
        client.files.list()
    with pytest.raises(openai.RateLimitError) as refused:
        client.files.list()
    assert refused.value.status_code == 429 and refused.value.code == "rate_limit_exceeded"
    assert int(refused.value.response.headers["retry-after"]) >= 1


def bootstrap_rows(sessions: SessionFactory, key: str) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).where(ApiKey.prefix == key[:KEY_PREFIX_CHARS])) or 0


def test_the_bootstrap_key_is_stored_and_a_revoke_holds_across_restarts(
    settings: Settings, sessions, caplog: pytest.LogCaptureFixture
) -> None:
    bootstrap = "gt-" + secrets.token_urlsafe(32)
    own = settings.model_copy(update={"bootstrap_api_key": SecretStr(bootstrap)})
    client = TestClient(create_app(own), headers={"Authorization": f"Bearer {bootstrap}"})
    with sessions() as session:
        row = find_key(session, bootstrap)
        assert session.get(Tenant, row.tenant_id).name == DEFAULT_TENANT
    assert row.name == BOOTSTRAP_KEY_NAME and row.key_sha256 == key_sha256(bootstrap)
    assert client.get(FILES).status_code == 200

    with sessions() as session:
        revoke_key(session, bootstrap[:KEY_PREFIX_CHARS])  # as `greentrainer keys revoke <prefix>` does
    assert client.get(FILES).status_code == 401  # the running app, not restarted
    with caplog.at_level(logging.WARNING, logger="api.keys"):
        restarted = create_app(own)  # the same GT_BOOTSTRAP_API_KEY
    assert "stays revoked" in caplog.text
    assert TestClient(restarted, headers=client.headers).get(FILES).status_code == 401
    assert bootstrap_rows(sessions, bootstrap) == 1


def test_api_processes_starting_together_store_the_bootstrap_key_once(settings: Settings, sessions) -> None:
    bootstrap = "gt-" + secrets.token_urlsafe(32)
    starting = 4
    together = threading.Barrier(starting)

    def start() -> str:
        factory = make_session_factory(settings)  # as a process of its own: connections of its own
        try:
            with factory() as session:
                together.wait()
                return store_bootstrap_key(session, bootstrap).id
        finally:
            factory.kw["bind"].dispose()

    with ThreadPoolExecutor(starting) as pool:
        ids = list(pool.map(lambda _: start(), range(starting)))
    assert len(set(ids)) == 1
    assert bootstrap_rows(sessions, bootstrap) == 1


def test_a_bootstrap_key_that_starts_as_a_stored_key_is_refused_at_start(
    settings: Settings, sessions
) -> None:
    stored = new_key(sessions)
    clash = stored[:KEY_PREFIX_CHARS] + secrets.token_urlsafe(24)
    with pytest.raises(BootstrapKeyClash, match="starts differently"):
        create_app(settings.model_copy(update={"bootstrap_api_key": SecretStr(clash)}))
