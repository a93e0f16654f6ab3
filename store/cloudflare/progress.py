"""Progress of a long sync pass on stderr: a bar on a terminal (rich), plain lines otherwise."""

from typing import Any


class progress_reporter:  # noqa: N801 - used as a function
    """Progress of a long pass: a bar on a terminal (rich), a plain line every 10,000 keys
    otherwise."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}
        self._last: dict[str, int] = {}
        if hasattr(stream, "isatty") and stream.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(file=stream), transient=True)
            self._bar.start()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self._bar is not None:
            task = self._tasks.get(stage)
            if task is None:
                task = self._tasks[stage] = self._bar.add_task(
                    "listing keys" if stage == "list" else "fetching values", total=total)
            self._bar.update(task, completed=done, total=total)
            return
        if done - self._last.get(stage, 0) >= 10_000 or (total is not None and done == total
                                                          and done):
            self._last[stage] = done
            of = f" of {total}" if total is not None else ""
            print(f"sync: {'listed' if stage == 'list' else 'fetched'} {done}{of}",
                  file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
