"""The gateway's registry cache (services/gateway/registry_cache.py), on a hand-driven clock."""

from __future__ import annotations

from services.gateway.registry_cache import RegistryCache
from shared.schemas import ClientIdentity, DeployedModel

CLIENT = ClientIdentity(client_id=3, name="clinic")
MODEL = DeployedModel(name="ecg", version=2, n_features=80, classes=["N", "AF"], sha256="ab" * 32)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _cache(ttl: float = 5.0, **options: float) -> tuple[RegistryCache, Clock]:
    clock = Clock()
    cache = RegistryCache(ttl, clock=clock, **options)  # type: ignore[arg-type]
    cache.activate()
    return cache, clock


def test_nothing_is_served_before_the_subscription_is_confirmed_nor_after_it_is_lost() -> None:
    clock = Clock()
    cache = RegistryCache(5.0, clock=clock)
    cache.store(cache.generation, "h", CLIENT, "ecg", MODEL, 0)
    assert cache.lookup("h", "ecg") is None  # not active yet: nothing kept
    cache.activate()
    cache.store(cache.generation, "h", CLIENT, "ecg", MODEL, 0)
    assert cache.lookup("h", "ecg") == (CLIENT, MODEL, 0)
    cache.deactivate()
    assert cache.lookup("h", "ecg") is None
    cache.activate()
    assert cache.lookup("h", "ecg") is None  # emptied: changes may have been missed meanwhile
    assert (cache.hits, cache.misses) == (1, 1)  # lookups while inactive are not counted


def test_an_entry_lives_ttl_seconds_and_needs_a_fresh_queue_length() -> None:
    cache, clock = _cache(ttl=5.0, backlog_max_age=1.0)
    cache.store(cache.generation, "h", CLIENT, "ecg", MODEL, 7)
    clock.now += 0.9
    assert cache.lookup("h", "ecg") == (CLIENT, MODEL, 7)
    clock.now += 0.2  # the queue length is 1.1 s old
    assert cache.lookup("h", "ecg") is None
    cache.observe_backlog(12)  # a job pushed: Redis said how many wait
    assert cache.lookup("h", "ecg") == (CLIENT, MODEL, 12)
    clock.now += 4.0  # 5.1 s after the entries were read
    cache.observe_backlog(0)
    assert cache.lookup("h", "ecg") is None
    assert cache.lookup("other key", "ecg") is None
    assert cache.lookup("h", "other model") is None


def test_a_change_empties_the_cache_and_a_read_begun_before_it_is_not_kept() -> None:
    cache, _ = _cache()
    cache.store(cache.generation, "h", CLIENT, "ecg", MODEL, 0)
    began = cache.generation  # a lookup goes to Redis ...
    cache.invalidate()  # ... while the registry changes: Redis may have answered before the change
    assert cache.lookup("h", "ecg") is None
    cache.store(began, "h", CLIENT, "ecg", MODEL, 0)
    assert cache.lookup("h", "ecg") is None
    cache.store(cache.generation, "h", CLIENT, "ecg", MODEL, 0)
    assert cache.lookup("h", "ecg") == (CLIENT, MODEL, 0)


def test_a_zero_ttl_turns_the_cache_off() -> None:
    cache, _ = _cache(ttl=0.0)
    assert not cache.enabled
    assert not cache.active
    cache.store(cache.generation, "h", CLIENT, "ecg", MODEL, 0)
    assert cache.lookup("h", "ecg") is None


def test_the_cache_holds_at_most_max_entries() -> None:
    cache, _ = _cache(max_entries=3)
    for index in range(3):
        cache.store(cache.generation, f"key {index}", CLIENT, "ecg", MODEL, 0)
    assert cache.lookup("key 0", "ecg") is not None
    cache.store(cache.generation, "key 3", CLIENT, "ecg", MODEL, 0)  # full: emptied, then kept
    assert cache.lookup("key 0", "ecg") is None
    assert cache.lookup("key 3", "ecg") == (CLIENT, MODEL, 0)
