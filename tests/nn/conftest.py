"""Fixtures of the module tests (tests/nn)."""

import pytest


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(module, name) -> calls``: replace the global ``name`` of ``module`` by a wrapper
    that appends to the returned list at each call (undone after the test, or by ``monkeypatch.undo()``).

    The modules of vlfast.nn look their op and their reference formula up as module globals at each
    call, so this shows which of the two a ``fused`` setting takes."""

    def install(module, name):
        calls = []
        real = getattr(module, name)

        def counting(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
        return calls

    return install
