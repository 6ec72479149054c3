"""The folders a run writes to, checked before the first node runs: a read-only ``data/`` fails before
the compute, not at the last save."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class OutputNotWritableError(PermissionError):
    """A folder the run will write to cannot be written; raised before the first node runs."""


def dataset_config(catalog: Any, name: str) -> dict[str, Any]:
    """Catalog entry ``name``'s configuration as the catalog resolved it (dataset factories, globals and
    credentials applied), through Kedro's public resolver; ``{}`` for a dataset made in memory."""
    try:
        return dict(catalog.config_resolver.resolve_pattern(name) or {})
    except Exception:   # a catalog built in code, without configuration
        return {}


def output_folders(datasets: Mapping[str, Mapping[str, Any]], params: Mapping[str, Any] | None = None,
                   blocks: Iterable[str] = ()) -> dict[Path, str]:
    """The local folders a run writes to, each with the setting that puts it there.

    ``datasets`` maps each output dataset's name to its catalog configuration (:func:`dataset_config`):
    a ``filepath`` is written into its parent folder, a ``path`` is a folder dataset. Remote
    locations (``s3://`` and the like) and models marked ``pretrained`` (never written) are left out. The stages' checkpoint folders and the
    tune study's SQLite file are added for the parameter ``blocks`` the pipeline reads.
    """
    folders: dict[Path, str] = {}
    for name, described in sorted(datasets.items()):
        location = str(described.get("filepath") or described.get("path") or "")
        if ("://" in location and not location.startswith("file://")) or described.get("pretrained"):
            continue
        location = location.removeprefix("file://")
        if described.get("filepath"):
            folders.setdefault(Path(location).parent, f"catalog entry '{name}'")
        elif described.get("path"):
            folders.setdefault(Path(location), f"catalog entry '{name}'")
    params, blocks = params or {}, set(blocks)
    for block in ("stage1", "stage2"):
        directory = (params.get(block) or {}).get("checkpoint_dir") if block in blocks else None
        if directory:
            folders.setdefault(Path(directory), f"parameter '{block}.checkpoint_dir'")
    storage = str((params.get("tune") or {}).get("storage") or "") if "tune" in blocks else ""
    if storage.startswith("sqlite:///"):
        folders.setdefault(Path(storage.removeprefix("sqlite:///")).parent, "parameter 'tune.storage'")
    return folders


def _unwritable(folder: Path) -> str | None:
    """Why nothing can be written at ``folder`` (None if it can): its nearest existing ancestor must
    be a folder that takes a new file. Probed with a real temporary file rather than `os.access`,
    which says yes to root whatever the permissions and knows nothing of ACLs or network mounts."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"'{existing}' is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"'{existing}' is not writable"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"'{existing}' is not writable ({error.strerror or error})"
    return None


def check_writable(folders: Mapping[Path | str, str]) -> None:
    """Raise :class:`OutputNotWritableError` (one sentence) for the first folder nothing can be written to.

    ``folders`` maps each folder to what writes there (as :func:`output_folders` returns). Folders
    that do not exist yet are fine when they can be created (their nearest existing ancestor is a
    writable folder); nothing is created here.
    """
    for folder, owner in folders.items():
        reason = _unwritable(Path(folder))
        if reason is not None:
            raise OutputNotWritableError(
                f"Output folder '{folder}' ({owner}) cannot be written: {reason}; fix its permissions or "
                "point that setting at a writable folder in conf/<env>/ before running again."
            )
