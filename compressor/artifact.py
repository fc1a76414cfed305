"""The artifact folder: claimed, staged, and published whole.

A run claims its destination first (an exclusive lock beside it, so no two runs can both publish
to one folder), works in a hidden staging folder next to it, writes the manifest of hashes last and
renames the folder into place. An interrupted or failed run leaves nothing at the destination and
removes its staging folder; staging folders left by a killed run are removed by the next claim.
Published folders get ordinary permissions (the user's umask), not the private ones of a
temporary folder. An export written into an artifact (its `onnx/` folder) is staged and swapped in
the same way (`staging_beside`), under the artifact's claim.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

from compressor.errors import CompressorError, one_line
from compressor.manifest import MANIFEST_FILE, MANIFEST_FORMAT, write_manifest
from compressor.safe_load import read_json as read_checked_json

# Errors of the file system that are the user's situation, not a defect: reported as one line.
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
# Room kept free beyond what a run predicts it writes (analysis, report, tokenizer, headers).
SPACE_MARGIN = 64 << 20


def _artifact_like(folder: Path) -> bool:
    """A folder this toolkit wrote: its manifest, an artifact config.json or an analysis.json of ours
    (a plain transformers model folder, say the run's own source, is not one)."""
    def has(name: str, key: str, value: str) -> bool:
        try:
            return json.loads((folder / name).read_text(encoding="utf-8")).get(key) == value
        except (OSError, ValueError, AttributeError):
            return False

    def marked() -> bool:  # the standard and Nemotron-NAS forms (exporters.config_forms)
        try:
            return isinstance(json.loads((folder / "config.json").read_text(encoding="utf-8")).get(
                "compressor_artifact"), dict)
        except (OSError, ValueError, AttributeError):
            return False

    return (has(MANIFEST_FILE, "format", MANIFEST_FORMAT) or has("config.json", "model_type", "compressor_decoder")
            or marked() or has("analysis.json", "format", "compressor-analysis/1"))


def check_destination(dest: str | Path, force: bool) -> Path:
    """The destination as an absolute path (relative to the caller's working folder), refused when
    it exists without `force`, when it is not a folder, or when `force` would replace a folder that
    holds anything but an artifact of this toolkit (or the working folder, or one above it)."""
    dest = Path(os.path.abspath(dest))
    if str(dest) in (os.sep, "") or dest == Path.home() or Path.cwd().is_relative_to(dest):
        raise CompressorError(f"output folder {dest} is the working folder, one above it, the home folder or the "
                              "root; choose a folder of its own")
    if dest.is_symlink():
        raise CompressorError(f"output path {dest} is a symbolic link; give the real folder")
    if dest.exists():
        if not dest.is_dir():
            raise CompressorError(f"output path exists and is not a folder: {dest}")
        if not force:
            raise CompressorError(f"output folder exists: {dest} (pass --force to replace it)")
        if any(dest.iterdir()) and not _artifact_like(dest):
            raise CompressorError(f"output folder {dest} holds files that are not an artifact of this toolkit; "
                                  "--force replaces only folders this toolkit wrote (an artifact or an analysis)")
    return dest


def disk_error(exc: OSError, where: Path) -> CompressorError | None:
    """The one-line error for a file-system failure that is the user's to fix, else None."""
    reason = DISK_ERRORS.get(exc.errno)
    if reason is None:
        return None
    return CompressorError(f"cannot write {where}: {reason} ({one_line(exc.strerror or exc, 80)})")


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def require_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuses to start work whose output cannot fit (checked before the long steps)."""
    available = free_bytes(folder)
    if available < needed + SPACE_MARGIN:
        raise CompressorError(f"{folder}: {available / 1e6:.0f} MB free, but {what} needs about "
                              f"{(needed + SPACE_MARGIN) / 1e6:.0f} MB; free some space or choose another --out")


class _Lock:
    """An exclusive, non-blocking lock on `.NAME.lock` beside a folder. The kernel drops it when the
    process dies, so a killed run never leaves the folder locked."""

    def __init__(self, folder: Path):
        self.path = folder.parent / f".{folder.name}.lock"
        self.folder = folder
        self.fd = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise CompressorError(f"{self.folder}: another compress run (pid {holder}) is writing it; wait for "
                                      "it to finish or choose another --out") from None
            # The holder before us may have removed the file after we opened it: lock the live one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


def _remove_stale_staging(dest: Path) -> None:
    """What runs on `dest` that were killed left (their lock is gone, ours is held): staging folders
    are removed; a replaced folder set aside (`.NAME.old-PID`) is put back if `dest` is missing,
    since the run died between the two renames of its swap."""
    staging = re.compile(re.escape(f".{dest.name}.partial-") + r"[a-z0-9_]{8}")
    old = re.compile(re.escape(f".{dest.name}.old-") + r"\d+")
    for entry in dest.parent.iterdir():
        if staging.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
        elif old.fullmatch(entry.name):
            if not dest.exists():
                os.replace(entry, dest)
            else:
                shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def signals_blocked():
    """SIGINT, SIGTERM and SIGHUP wait until the block ends (for renames that must happen together)."""
    wanted = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def swap_into_place(staging: Path, dest: Path) -> None:
    """Renames `staging` to `dest`, replacing a `dest` folder; never leaves `dest` missing while an
    old one exists: signals wait, and a failed second rename puts the old folder back."""
    with signals_blocked():
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            try:
                os.replace(staging, dest)
            except BaseException:
                os.replace(old, dest)
                raise
        else:
            old = None
            os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_permissions(folder: Path) -> None:
    """Folders rwx and files rw for whoever the umask allows, like any folder the user creates."""
    umask = os.umask(0)
    os.umask(umask)

    def chmod(path, mode):
        with contextlib.suppress(PermissionError):  # a file of another user's, in an update in place
            os.chmod(path, mode & ~umask)

    chmod(folder, 0o777)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            chmod(os.path.join(root, name), 0o777)
        for name in files:
            chmod(os.path.join(root, name), 0o666)


# While a run works, only these are surely about the destination (EACCES could be the source's).
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@contextlib.contextmanager
def _reporting_disk_errors(where: Path, codes=tuple(DISK_ERRORS)):
    try:
        yield
    except OSError as exc:
        error = disk_error(exc, where) if exc.errno in codes else None
        if error is None:
            raise
        raise error from None


@contextlib.contextmanager
def staging_beside(dest: Path, before_swap=None, remove_stale: bool = True):
    """Yields an empty hidden staging folder beside `dest` (`.NAME.partial-XXXXXXXX`); when the block
    succeeds, gives it ordinary permissions, calls `before_swap(staging)` and swaps it into place of
    `dest` (swap_into_place); on any failure or interruption it is deleted and `dest` is left as it
    was. First removes what killed runs left beside `dest` (_remove_stale_staging), unless the caller
    already did. The caller holds the claim on `dest` (its lock, or its artifact folder's)."""
    dest = Path(dest)
    if remove_stale:
        _remove_stale_staging(dest)
    with _reporting_disk_errors(dest.parent):
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield staging
        publish_permissions(staging)
        if before_swap is not None:
            before_swap(staging)
        swap_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_folder(dest: str | Path, force: bool = False):
    """Claims `dest`, yields an empty staging folder; on success the staging folder gets the
    manifest and replaces `dest`, on any failure or interruption it is deleted and `dest` is left
    as it was. Hold it around the whole run, so that the claim comes before the work."""
    dest = check_destination(dest, force)
    with _reporting_disk_errors(dest.parent):
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = _Lock(dest)
        lock.acquire()
    try:
        _remove_stale_staging(dest)  # first: it may put back an artifact a killed run had set aside
        dest = check_destination(dest, force)  # again, now that no other run can change it

        def finish(staging: Path) -> None:
            write_manifest(staging)
            if dest.exists() and not force:
                raise CompressorError(f"output folder {dest} appeared while this run was working; its result "
                                      "was not published (pass --force to replace it)")

        with (_reporting_disk_errors(dest, _WRITE_ERRORS),
              staging_beside(dest, before_swap=finish, remove_stale=False) as staging):
            yield staging
    finally:
        lock.release()


@contextlib.contextmanager
def updating_in_place(folder: str | Path):
    """For steps that add to a published artifact (an evaluation's report, an export): holds the
    folder's lock while they read and write (so no other run can publish there meanwhile), then
    writes its manifest again. Hold it around the whole step, reading included."""
    folder = Path(os.path.abspath(folder))
    lock = _Lock(folder)
    with _reporting_disk_errors(folder):
        lock.acquire()
    try:
        with _reporting_disk_errors(folder, _WRITE_ERRORS):
            yield folder
            with signals_blocked():
                publish_permissions(folder)
                write_manifest(folder)
    finally:
        lock.release()


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# Largest JSON file the toolkit reads (plans and analyses of 70B models are a few MB).
JSON_LIMIT = 256 << 20


def read_json(path: Path, what: str, kind: type | None = dict):
    """A JSON file as data, with one clear error for a missing, oversized, non-UTF-8, malformed,
    too deeply nested file or one with repeated keys (compressor.safe_load), or (with `kind`) one
    whose top level is of another type."""
    path = Path(path)
    data = read_checked_json(path, what, limit=JSON_LIMIT)
    if kind is not None and not isinstance(data, kind):
        raise CompressorError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__} at the top "
                              f"level for {what}, got {type(data).__name__}")
    return data
