"""Progress bars (rich) that stay quiet when not wanted or not on a terminal."""

from __future__ import annotations

from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress | None, task_id) -> None:
        self._progress, self._task = progress, task_id

    def advance(self, n: int = 1, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **fields)

    def set(self, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **fields)


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True, status: bool = False):
    """A rich progress bar; ``status=True`` adds a free-text field updated with ``bar.set(status=...)``."""
    if not enabled:
        yield _Bar(None, None)
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    if status:
        columns.append(TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=False) as progress:
        task_id = progress.add_task(description, total=total, status="")
        yield _Bar(progress, task_id)
