"""Test doubles of the engine's forward (pipeline.engines.forwards.Forward): a real forward, with
faults injected through its public interface. `wrap_chosen` makes every engine built while a test
runs (in this process: `run`, the CLI through CliRunner) get the double, by wrapping what
forwards.choose picks."""

from __future__ import annotations

from pipeline.engines import forwards


class FaultyForward:
    """Runs `inner`; `fault(batch, calls)` is asked first on every call (calls: this one's number,
    from 1) and raises to fail the batch, or returns to let it run."""

    def __init__(self, inner, fault):
        self.inner, self.fault, self.calls = inner, fault, 0
        self.name, self.kernel, self.padded = inner.name, inner.kernel, inner.padded

    @property
    def compiled(self) -> bool:
        return self.inner.compiled

    def logits(self, batch):
        self.calls += 1
        self.fault(batch, self.calls)
        return self.inner.logits(batch)


def wrap_chosen(monkeypatch, fault) -> None:
    """Every forward chosen from now on (until the test ends) is a FaultyForward with `fault`."""
    real = forwards.choose
    monkeypatch.setattr(forwards, "choose", lambda m, cfg: FaultyForward(real(m, cfg), fault))
