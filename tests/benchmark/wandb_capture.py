"""What W&B stores of a run, captured from real offline runs of the CLI, served as W&B's public API does.

:func:`capture_wandb` records every run the benchmark opens in offline mode: the rows it logs (the
history), its config and summary when it finishes, its job type and the state W&B gives it (a
non-zero exit code is "failed"). :class:`RecordedApi` answers ``api.runs(path, filters)`` with them,
so ``leaderboard --wandb`` reads exactly what the runs logged, without a server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from wandb.sdk.wandb_run import Run


class RecordedRun:
    """A W&B public-API run: name, config, summary, history, job type, state, url."""

    def __init__(self, name: str, config: dict[str, Any], summary: dict[str, Any], history: list[dict[str, Any]],
                 job_type: str = "fit", state: str = "finished") -> None:  # fmt: skip
        self.name, self.config, self.summary, self._history = name, config, summary, history
        self.job_type, self.state = job_type, state
        self.url: str | None = None

    def history(self, pandas: bool = True) -> list[dict[str, Any]]:
        return self._history


class RecordedApi:
    """``wandb.Api()`` over recorded runs; ``filters`` as the leaderboard passes them (``config.KEY``)."""

    def __init__(self, runs: list[RecordedRun]) -> None:
        self._runs, self.calls = runs, []

    def runs(self, path: str, filters: dict[str, Any] | None = None) -> list[RecordedRun]:
        self.calls.append((path, filters))
        # Typed equality, as W&B's server compares config values: the text "0" does not match a seed 0.
        return [r for r in self._runs if all(r.config.get(k.split(".", 1)[1]) == v for k, v in (filters or {}).items())]


@contextlib.contextmanager
def capture_wandb(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[RecordedRun]]:
    """Record every W&B run opened inside the block (offline mode is set here)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    recorded: list[RecordedRun] = []
    histories: dict[int, list[dict[str, Any]]] = {}
    log, finish = Run.log, Run.finish

    def recording_log(self: Run, data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        histories.setdefault(id(self), []).append(dict(data))
        return log(self, data, *args, **kwargs)

    def recording_finish(self: Run, exit_code: int | None = None, *args: Any, **kwargs: Any) -> Any:
        if id(self) in histories or not any(r.name == self.name for r in recorded):  # once per run
            recorded.append(RecordedRun(self.name, dict(self.config), dict(self.summary), histories.pop(id(self), []),
                                        job_type=self.job_type or "", state="finished" if not exit_code else "failed"))
        return finish(self, exit_code, *args, **kwargs)

    monkeypatch.setattr(Run, "log", recording_log)
    monkeypatch.setattr(Run, "finish", recording_finish)
    yield recorded
