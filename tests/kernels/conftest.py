"""Fixtures of the kernel tests."""
import pytest


@pytest.fixture
def decode_splits(monkeypatch):
    """Records how many KV splits each decode launch used (so a 'long context' test can show it split)."""
    from cattn import launch
    seen, original = [], launch.num_splits

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(launch, "num_splits", spy)
    return seen
