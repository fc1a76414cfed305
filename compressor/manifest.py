"""The artifact's manifest: every file's size and SHA-256, written last, checked at load.

`manifest.json` at the artifact's top level lists every file below it (hidden names, such as an
export's staging folder, are not part of an artifact). `verify_manifest` refuses a file that is
missing, changed, truncated or not listed, so a flipped byte anywhere (weights, scales, config,
tokenizer, ONNX graph or its external data) is an error at load instead of wrong logits.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from compressor.errors import CompressorError, one_line, shorten

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "compressor-manifest/1"
_CHUNK = 16 << 20
# hashlib releases the GIL on large buffers, so two files hash on two cores at once.
_HASH_THREADS = max(1, min(4, os.cpu_count() or 1))


def artifact_files(folder: Path) -> list[str]:
    """Relative paths (with '/') of the files an artifact consists of: everything but the manifest
    itself and hidden entries."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            rel = Path(root, name).relative_to(folder).as_posix()
            if rel != MANIFEST_FILE:
                found.append(rel)
    return found


def file_digest(path: Path) -> tuple[int, str]:
    """(bytes, SHA-256 hex) of one file, read in large chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            n = handle.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


def _digests(folder: Path, names: list[str]) -> dict[str, tuple[int, str]]:
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return dict(zip(names, pool.map(lambda n: file_digest(folder / n), names)))


def write_manifest(folder: str | Path) -> dict:
    """Hashes every file of the artifact and writes manifest.json (atomically); returns it."""
    folder = Path(folder)
    names = artifact_files(folder)
    manifest = {"format": MANIFEST_FORMAT, "algorithm": "sha256",
                "files": {name: {"bytes": size, "sha256": sha} for name, (size, sha) in _digests(folder, names).items()}}
    staging = folder / f".{MANIFEST_FILE}.partial"
    staging.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(staging, folder / MANIFEST_FILE)
    return manifest


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise CompressorError(f"{folder}: no {MANIFEST_FILE}, so its files cannot be checked (an artifact from an "
                              "older version, or one whose manifest was removed); check the files and write one with "
                              f"`compress verify {folder} --update`, or load with verify=False")
    if path.stat().st_size > 64 << 20:
        raise CompressorError(f"{path}: {path.stat().st_size} bytes, too large for a manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CompressorError(f"{path}: not a valid manifest ({one_line(exc, 120)})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise CompressorError(f"{path}: not a manifest of this toolkit (expected format {MANIFEST_FORMAT!r} "
                              "and a 'files' object)")
    for name, entry in files.items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int)
                or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64):
            raise CompressorError(f"{path}: entry {shorten(name)} must be {{\"bytes\": int, \"sha256\": 64 hex digits}}, "
                                  f"got {shorten(entry)}")
        if name.startswith("/") or ".." in Path(name).parts or "\\" in name:
            raise CompressorError(f"{path}: entry {shorten(name)} points outside the artifact")
    return manifest


def verify_manifest(folder: str | Path, skip: tuple[str, ...] = ()) -> dict:
    """Checks every file against manifest.json; returns {files, bytes, seconds}. Sizes are checked
    for all files before any hashing, so a truncated file is reported at once. Files under the
    `skip` prefixes (a part about to be written anew, such as "onnx/") are left out."""
    folder = Path(folder)
    started = time.perf_counter()
    listed = {name: entry for name, entry in read_manifest(folder)["files"].items() if not name.startswith(skip)}
    present = [name for name in artifact_files(folder) if not name.startswith(skip)]
    unlisted = [name for name in present if name not in listed]
    if unlisted:
        raise CompressorError(f"{folder}: {shorten(unlisted[0])} is not in {MANIFEST_FILE} (added after the artifact "
                              f"was written{f', with {len(unlisted) - 1} more' if len(unlisted) > 1 else ''}); "
                              f"remove it, or accept it with `compress verify {folder} --update`")
    for name, entry in listed.items():
        path = folder / name
        if not path.is_file():
            raise CompressorError(f"{folder}: {name} is listed in {MANIFEST_FILE} but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CompressorError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
    for name, (size, sha) in _digests(folder, list(listed)).items():
        if sha != listed[name]["sha256"]:
            raise CompressorError(f"{folder / name}: content does not match its SHA-256 in {MANIFEST_FILE} "
                                  "(the file was changed or damaged after the artifact was written)")
    return {"files": len(listed), "bytes": sum(e["bytes"] for e in listed.values()),
            "seconds": time.perf_counter() - started}
