"""The per-round memory release of sites and server."""

from __future__ import annotations

import pytest

from fedbrats.federated import memory


def test_release_memory_collects_cycles_every_n_rounds_and_always_trims(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(memory, "cleanup_memory", lambda: calls.append("gc+trim"))
    monkeypatch.setattr(memory, "try_malloc_trim", lambda: calls.append("trim"))
    for completed in range(1, 7):
        memory.release_memory(completed, gc_rounds=3)
    assert calls == ["trim", "trim", "gc+trim", "trim", "trim", "gc+trim"]
    calls.clear()
    memory.release_memory(5, gc_rounds=0)
    assert calls == ["trim"], "gc_rounds=0 never collects but still trims"


@pytest.mark.parametrize(("completed", "gc_rounds", "name"), [(-1, 1, "completed_rounds"), (1, -2, "gc_rounds")])
def test_release_memory_rejects_negative_arguments(completed: int, gc_rounds: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        memory.release_memory(completed, gc_rounds)


def test_controller_and_executor_reject_negative_gc_rounds() -> None:
    from fedbrats.federated.client.executor import FedBratsExecutor
    from fedbrats.federated.server.controller import FedBratsController

    with pytest.raises(ValueError, match="memory_gc_rounds"):
        FedBratsController(memory_gc_rounds=-1)
    with pytest.raises(ValueError, match="memory_gc_rounds"):
        FedBratsExecutor(memory_gc_rounds=-1)


def test_the_sites_memory_clean_up_is_nvflares_client_api_option() -> None:
    """The executor hands memory_gc_rounds to NVFlare's ClientAPIExecutor, which cleans up after every N sends."""
    from fedbrats.federated.client.executor import FedBratsExecutor

    assert FedBratsExecutor()._memory_gc_rounds == memory.SITE_GC_ROUNDS
    assert FedBratsExecutor(memory_gc_rounds=3)._memory_gc_rounds == 3


def test_allocator_defaults_never_override_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy.processes import deployment_env

    assert memory.with_allocator_defaults({})["MALLOC_ARENA_MAX"] == "2"
    assert memory.with_allocator_defaults({"MALLOC_ARENA_MAX": "8"})["MALLOC_ARENA_MAX"] == "8"
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert deployment_env("m")["MALLOC_ARENA_MAX"] == "2", "PoC and provisioned kits get the default"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert deployment_env("m")["MALLOC_ARENA_MAX"] == "4"
