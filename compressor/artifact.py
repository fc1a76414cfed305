"""The artifact folder: written into a temporary sibling folder and renamed into place at the end,
so an interrupted run never leaves a half-written artifact where a finished one is expected."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from compressor.errors import CompressorError


def check_destination(dest: str | Path, force: bool) -> Path:
    dest = Path(dest)
    if dest.exists() and not force:
        raise CompressorError(f"output folder exists: {dest} (pass --force to replace it)")
    if dest.exists() and not dest.is_dir():
        raise CompressorError(f"output path exists and is not a folder: {dest}")
    return dest


@contextlib.contextmanager
def staged_folder(dest: str | Path, force: bool = False):
    """Yields a temporary folder; on success it replaces `dest`, on failure it is deleted."""
    dest = check_destination(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: Path, what: str):
    if not path.is_file():
        raise CompressorError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CompressorError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
