"""Progress bars (rich) that stay quiet when not wanted or not on a terminal."""

from __future__ import annotations

from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column


class _Bar:
    def __init__(self, progress: Progress | None, task_id, room: int = 0) -> None:
        self._progress, self._task, self._room = progress, task_id, room

    def _fit(self, fields: dict) -> dict:
        """The status text cut to the terminal's room (one line: the count and times stay whole)."""
        status = fields.get("status")
        if isinstance(status, str) and self._room and len(status) > self._room:
            fields = {**fields, "status": status[: max(0, self._room - 1)] + "…"}
        return fields

    def advance(self, n: int = 1, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **self._fit(fields))

    def set(self, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **self._fit(fields))


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True, status: bool = False):
    """A rich progress bar; ``status=True`` adds a free-text field updated with ``bar.set(status=...)``."""
    if not enabled:
        yield _Bar(None, None)
        return
    # at 80 columns the count and the times stay whole ("1000/1000", not "1000/10…"): the bar is
    # short and the free-text status gives way first
    whole = lambda: Column(no_wrap=True)  # noqa: E731
    columns = [TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
               BarColumn(bar_width=20), MofNCompleteColumn(table_column=whole()), TimeElapsedColumn(table_column=whole()),
               TimeRemainingColumn(table_column=whole())]
    if status:
        columns.append(TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True)))
    with Progress(*columns, transient=False) as progress:
        task_id = progress.add_task(description, total=total, status="")
        count = len(f"{total}/{total}") if total else 8
        room = progress.console.width - len(description) - 20 - count - 2 * 7 - 6  # columns + the spaces between
        yield _Bar(progress, task_id, max(room, 8) if status else 0)
