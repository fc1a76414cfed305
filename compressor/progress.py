"""Progress bars for long steps (tqdm on stderr), silenced by --quiet."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress(iterable, description: str, quiet: bool = False, total: int | None = None):
    return tqdm(iterable, desc=description, total=total, disable=quiet, leave=False, dynamic_ncols=True)
