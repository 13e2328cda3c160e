"""Rate limits (GT_RATE_LIMIT_*_PER_MIN, 0 = unlimited): requests per API key and per tenant, estimates per
tenant, and requests with a wrong API key per client address, each counted in a one-minute window by the
``limits`` library. Past one, a request answers 429 (api.errors.RateLimited) with Retry-After.

The counters live in Redis on production (GT_RATE_LIMIT_STORAGE_URL, by default the broker's Redis, keys
under GT_BROKER_PREFIX), so that every API process counts against the same limits; on the embedded default
(one process) they live in its memory.

Every method may block on Redis: the API calls them on a DB thread, in the hop that looks the key up
(api.deps.current_tenant), rather than through ``limits.aio`` on the event loop. That hop is taken for the
lookup anyway, so limiting adds no thread hand-over (bench/results/api_threads.md), and the synchronous
Redis client holds no connection tied to one event loop (an async pool breaks when one app is served by
several loops, as the tests' clients do). In memory a call is a dict update under a lock.

Fixed windows: one counter per limit and identity (one Redis round trip per hit), and Retry-After is exact:
the counter's time to live. A window starts at its first hit, so a burst may reach twice a limit across two
windows; these limits stop runaway loops and key guessing, they do not shape traffic.

When the storage fails (Redis down), requests pass: the API keeps serving what the database answers, as it
does while the broker is down. A warning is logged when the storage fails and when it answers again.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.errors import StorageError
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import FixedWindowRateLimiter

from api.config import Settings
from api.errors import RateLimited
from api.keys import KEY_PREFIX_CHARS

log = logging.getLogger(__name__)

WINDOW_S = 60  # every limit is per minute
REDIS_KEY_PREFIX = "ratelimit"  # after GT_BROKER_PREFIX: the deployment's keys stay apart from another's
REDIS_TIMEOUT_S = 1.0  # a Redis that does not answer holds a DB thread at most this long per call
IPV6_NETWORK_BITS = 64  # one IPv6 client holds a whole /64: counted as one address
ESTIMATES_ROUTE = "create_estimate"  # name of the route (FastAPI's, as url_path_for takes it) of estimates


@dataclass(frozen=True)
class Limit:
    """One limit: its counter's item (amount per minute), the setting that sets it, and its rule in words
    (``{n}`` is the amount)."""

    item: RateLimitItem
    setting: str
    rule: str


def _limit(per_min: int, setting: str, rule: str) -> Limit | None:
    """The limit of ``per_min`` a minute; None for 0 (unlimited)."""
    if per_min == 0:
        return None
    return Limit(RateLimitItemPerMinute(per_min, namespace=setting.lower()), setting, rule)


def _storage(settings: Settings) -> Storage:
    """The counters' storage GT_RATE_LIMIT_STORAGE_URL names (memory:// or a Redis URL)."""
    url = settings.rate_limit_storage_url
    if url == "memory://":
        return MemoryStorage(wrap_exceptions=True)
    return RedisStorage(
        url,
        key_prefix=settings.broker_prefix + REDIS_KEY_PREFIX,
        wrap_exceptions=True,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
    )


def client_address(host: str | None) -> str:
    """The identity that failed authentications are counted under: the client's IP address (its /64 network
    for IPv6, which one client can fill with addresses); ``host`` as given when it is not an address (a test
    client, a Unix socket), "unknown" without one."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/{IPV6_NETWORK_BITS}", strict=False))
    return str(address)


class RateLimits:
    """The rate limits of one app (``app.state.rate_limits``), counted in the storage its settings name."""

    def __init__(self, settings: Settings) -> None:
        self.storage = _storage(settings)
        self.limiter = FixedWindowRateLimiter(self.storage)
        self.per_key = _limit(
            settings.rate_limit_key_per_min,
            "GT_RATE_LIMIT_KEY_PER_MIN",
            "an API key may make {n} requests a minute",
        )
        self.per_tenant = _limit(
            settings.rate_limit_tenant_per_min,
            "GT_RATE_LIMIT_TENANT_PER_MIN",
            "a tenant may make {n} requests a minute, all its keys together",
        )
        self.estimates = _limit(
            settings.rate_limit_estimates_per_min,
            "GT_RATE_LIMIT_ESTIMATES_PER_MIN",
            "a tenant may ask for {n} estimates a minute",
        )
        self.failed_auth = _limit(
            settings.rate_limit_failed_auth_per_min,
            "GT_RATE_LIMIT_FAILED_AUTH_PER_MIN",
            "an address may send a wrong API key {n} times a minute; then every request from it waits",
        )
        self._storage_failed = False

    def check_address(self, address: str) -> None:
        """RateLimited when ``address`` (see :func:`client_address`) has made as many requests with a wrong
        key as allowed in this window; call it before looking the key up."""
        if self.failed_auth is not None and not self._passes(self.limiter.test, self.failed_auth, address):
            raise self._refusal(self.failed_auth, address)

    def count_failed_auth(self, address: str) -> None:
        """Count one request with a wrong key from ``address``."""
        if self.failed_auth is not None:
            self._passes(self.limiter.hit, self.failed_auth, address)

    def count_request(self, key: str, tenant_id: str, estimate: bool) -> None:
        """Count one authenticated request of ``key`` (known by its prefix, as ``keys list`` shows it) of
        tenant ``tenant_id``, and one estimate when ``estimate``; RateLimited when that passes a limit. The
        key's limit is counted first: a key over its own limit does not use up its tenant's."""
        counted = (
            (self.per_key, key[:KEY_PREFIX_CHARS]),
            (self.per_tenant, tenant_id),
            (self.estimates if estimate else None, tenant_id),
        )
        for limit, identity in counted:
            if limit is not None and not self._passes(self.limiter.hit, limit, identity):
                raise self._refusal(limit, identity)

    def _passes(self, call: Callable[[RateLimitItem, str], bool], limit: Limit, identity: str) -> bool:
        """``call(limit.item, identity)`` (a hit or a test); True when the storage fails."""
        try:
            passed = call(limit.item, identity)
        except StorageError as exc:
            if not self._storage_failed:
                log.warning("rate limits are off while their storage fails: %r", exc.storage_error)
                self._storage_failed = True
            return True
        if self._storage_failed:
            log.warning("rate limits are on again: their storage answers")
            self._storage_failed = False
        return passed

    def _refusal(self, limit: Limit, identity: str) -> RateLimited:
        """The 429 of ``limit`` used up by ``identity``; Retry-After: when its window frees (at least 1 s)."""
        try:
            reset_at = self.limiter.get_window_stats(limit.item, identity).reset_time
        except StorageError:
            reset_at = time.time() + WINDOW_S
        retry_after_s = max(1, math.ceil(reset_at - time.time()))
        per_min = limit.item.amount
        return RateLimited(
            f"rate limit reached: {limit.rule.format(n=per_min)} ({limit.setting}); "
            f"retry after {retry_after_s} s",
            retry_after_s=retry_after_s,
            limit_per_min=per_min,
        )
