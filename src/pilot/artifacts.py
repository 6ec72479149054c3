"""Model artefacts written atomically with a checksum beside them, and verified on load.

A folder artefact (a hyper-network, a LoRA adapter, an embedded model) is written into a
temporary folder next to its destination, gets a ``checksums.json`` (sha256 of every file) and
is renamed into place, so a crash mid-write leaves the previous version or the new one, never
half of one. A single-file artefact (the CAA vector) gets a ``<file>.sha256`` beside it. Loading
verifies every digest first: a flipped byte stops the run with the path and the command that
rebuilds it, instead of a weight of 2.4e24 flowing silently into the next stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

CHECKSUMS = "checksums.json"
DEFAULT_REBUILD = "rerun the pipeline that writes it"


class ArtifactChecksumError(RuntimeError):
    """An artefact on disk is not the one that was written: corrupted, truncated or edited."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a scratch folder to write the artefact into; on success it gets its checksums and
    replaces ``path``. On an error the scratch folder is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
        files = sorted(p for p in scratch.rglob("*") if p.is_file())
        digests = {p.relative_to(scratch).as_posix(): sha256_file(p) for p in files}
        digests[CHECKSUMS] = _listing_digest(digests)
        (scratch / CHECKSUMS).write_text(json.dumps(digests, indent=1, sort_keys=True))
        for file in [*files, scratch / CHECKSUMS]:
            _fsync(file)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    previous = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, previous)  # a folder cannot be renamed over a non-empty one
    os.replace(scratch, path)
    shutil.rmtree(previous, ignore_errors=True)


def _listing_digest(digests: dict[str, str]) -> str:
    """The checksum of a folder's checksum listing: over every entry but its own."""
    entries = {name: digest for name, digest in digests.items() if name != CHECKSUMS}
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def verify_folder(path: str | Path, rebuild: str = DEFAULT_REBUILD) -> None:
    """Check every file listed in ``path/checksums.json``; raise naming the first that differs."""
    path = Path(path)
    listing = path / CHECKSUMS
    if not listing.is_file():
        raise ArtifactChecksumError(f"'{path}' has no {CHECKSUMS}, so it cannot be verified (written by an older "
                                    f"version, or incompletely); rebuild it with `{rebuild}`.")
    try:
        digests = json.loads(listing.read_text())
    except ValueError as error:
        raise ArtifactChecksumError(f"'{listing}' is unreadable ({error}); rebuild it with `{rebuild}`.") from None
    # Its own entry (absent in folders written by earlier versions) covers every other entry, so an
    # edited name is caught even where it now names another file of the folder.
    own = digests.pop(CHECKSUMS, None)
    if own is not None and own != _listing_digest(digests):
        raise ArtifactChecksumError(f"'{listing}' does not match its own checksum (changed since it was written); "
                                    f"rebuild it with `{rebuild}`.")
    for name, expected in digests.items():
        file = path / name
        if not file.is_file() or sha256_file(file) != expected:
            raise ArtifactChecksumError(f"'{file}' does not match its checksum (corrupted or changed since it was "
                                        f"written); rebuild it with `{rebuild}`.")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_file(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename to ``path``, with ``<path>.sha256`` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(scratch)
        _fsync(scratch)
        digest = sha256_file(scratch)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    _sidecar(path).unlink(missing_ok=True)  # never a new file beside an old digest
    os.replace(scratch, path)
    _sidecar(path).write_text(f"{digest}  {path.name}\n")


def verify_file(path: str | Path, rebuild: str = DEFAULT_REBUILD) -> None:
    path = Path(path)
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        raise ArtifactChecksumError(f"'{path}' has no checksum file '{sidecar.name}', so it cannot be verified; "
                                    f"rebuild it with `{rebuild}`.")
    recorded = sidecar.read_text().strip().split(None, 1)  # '<sha256>  <file name>'
    if len(recorded) > 1 and recorded[1] != path.name:
        raise ArtifactChecksumError(f"'{sidecar}' is the checksum of '{recorded[1]}', not of '{path.name}' (copied "
                                    f"from another file); rebuild it with `{rebuild}`.")
    if not recorded or sha256_file(path) != recorded[0]:
        raise ArtifactChecksumError(f"'{path}' does not match its checksum (corrupted or changed since it was "
                                    f"written); rebuild it with `{rebuild}`.")
