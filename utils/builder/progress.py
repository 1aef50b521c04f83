"""Progress of a build's long phases: a tqdm bar while stderr is a terminal; in a log (nohup, sbatch, a pipe) one plain
line per phase when it ends, never the `\\r`-joined redraws of a bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


class Progress:
    """`update(n)` as work is done, `close()` at the end: a bar on a terminal, else one line `desc: done/total unit
    in Ns`."""

    def __init__(self, desc: str, unit: str, total: int | None = None, enabled: bool = True) -> None:
        self.desc, self.unit, self.total, self.enabled = desc, unit, total, enabled
        self.done, self.started = 0, time.monotonic()
        self.bar = tqdm(total=total, desc=desc, unit=unit, mininterval=1.0) if enabled and sys.stderr.isatty() else None

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            of = f"/{self.total}" if self.total is not None else ""
            print(f"{self.desc}: {self.done}{of} {self.unit} in {time.monotonic() - self.started:.0f}s",
                  file=sys.stderr, flush=True)


def progress_bar(items: Iterable[T], desc: str, unit: str, enabled: bool = True) -> Iterator[T]:
    """The items, with a `Progress` of them."""
    progress = Progress(desc, unit, len(items) if hasattr(items, "__len__") else None, enabled)  # type: ignore[arg-type]
    try:
        for item in items:
            yield item
            progress.update()
    finally:
        progress.close()
