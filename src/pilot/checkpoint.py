"""Training checkpoints that survive a SIGKILL: safetensors + JSON, written atomically.

A checkpoint is a folder ``step-00000120/`` holding ``weights.safetensors`` (the trained
modules), ``optimizer.safetensors`` (the optimizer's tensors) and ``state.json`` (the step,
the optimizer's scalar state, the loss history so far and a sha256 of both tensor files).
It is written to a temporary folder and renamed into place, so a run killed mid-write leaves
either the previous checkpoints or the new one, never half of one. Randomness in the trainers
is derived from (seed, step), so the step alone is enough to resume bit-for-bit.

Each run keeps its checkpoints in a folder of its own, ``<directory>/<fingerprint>/step-...``
(the fingerprint names the data and settings). A run with other settings therefore never
touches the previous run's resumable checkpoints; the oldest runs' folders are pruned only after
the new run has saved its own first checkpoint, keeping the newest :data:`KEEP_RUNS` runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pilot import distributed
from pilot.artifacts import sha256_file

logger = logging.getLogger(__name__)


KEEP_RUNS = 2  # fingerprint folders kept: the current run and the one before it
STATE_CHECKSUM = "state_sha256"  # state.json's own checksum, over every other field


def _state_digest(state: dict[str, Any]) -> str:
    fields = {key: value for key, value in state.items() if key != STATE_CHECKSUM}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class CorruptCheckpointError(RuntimeError):
    pass


def run_fingerprint(*parts: object) -> str:
    """Names a training run by what determines it (data, settings, starting weights): checkpoints
    of another run are never resumed."""
    payload = json.dumps([p.model_dump() if hasattr(p, "model_dump") else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class CheckpointDeleteError(RuntimeError):
    """Old checkpoints could not be deleted, so a fresh start (``resume: false``) is impossible."""


def _step_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _is_run_folder(path: Path) -> bool:
    """A run's folder holds checkpoints and nothing else (never prune what a user keeps there)."""
    if not path.is_dir() or path.name.startswith(("step-", ".")):
        return False
    children = list(path.iterdir())
    return bool(children) and all(c.is_dir() and c.name.startswith(("step-", ".tmp-step-", ".deleting-step-")) for c in children)


def find_checkpoints(directory: str | Path) -> list[Path]:
    """Every checkpoint under ``directory``, of every run (fingerprint), oldest step first."""
    directory = Path(directory)
    runs = [directory, *(p for p in directory.iterdir() if p.is_dir())] if directory.is_dir() else []
    return sorted((step for run in runs for step in _step_folders(run)), key=lambda p: (p.name, str(p)))


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@dataclass
class Checkpoint:
    step: int
    path: Path
    history: list[dict[str, float]]
    extra: dict[str, Any]


class CheckpointManager:
    """Saves every ``every`` steps into ``directory/<fingerprint>``, keeps the newest ``keep``.

    ``fingerprint`` names the run (its data and configuration): only checkpoints of the same
    fingerprint are resumed; other runs' folders are left alone (and pruned to the newest
    :data:`KEEP_RUNS` once this run has saved a checkpoint of its own).
    """

    def __init__(self, directory: str | Path | None, every: int, keep: int = 2, fingerprint: str = "") -> None:
        self.directory = Path(directory) if directory else None
        self.every = every
        self.keep = keep
        self.fingerprint = fingerprint

    @property
    def run_directory(self) -> Path | None:
        """This run's own folder, ``<directory>/<fingerprint>`` (``default`` without a fingerprint)."""
        return self.directory / (self.fingerprint or "default") if self.directory is not None else None

    @property
    def enabled(self) -> bool:
        return self.directory is not None and self.every > 0

    def due(self, step: int) -> bool:
        return self.enabled and step > 0 and step % self.every == 0

    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
             history: list[dict[str, float]], extra: dict[str, Any] | None = None) -> Path:
        assert self.run_directory is not None
        self.run_directory.mkdir(parents=True, exist_ok=True)
        final = self.run_directory / f"step-{step:08d}"
        tmp = self.run_directory / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {f"{name}.{key}": value.detach().contiguous().cpu()
                   for name, module in modules.items() for key, value in module.state_dict().items()}
        save_file(weights, tmp / "weights.safetensors")
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        state = {
            "step": step,
            "optimizer": opt_meta,
            "history": history,
            "extra": extra or {},
            "fingerprint": self.fingerprint,
            "sha256": {name: sha256_file(tmp / name) for name in ("weights.safetensors", "optimizer.safetensors")},
        }
        state[STATE_CHECKSUM] = _state_digest(state)
        (tmp / "state.json").write_text(json.dumps(state))
        for file in tmp.iterdir():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.list()[:-self.keep]:
            _remove(old, strict=False)
        self._prune_other_runs()
        return final

    def _prune_other_runs(self) -> None:
        """Keep this run's folder and the newest other runs', :data:`KEEP_RUNS` in all (best effort)."""
        assert self.directory is not None and self.run_directory is not None
        others = [p for p in self.directory.iterdir() if p != self.run_directory and _is_run_folder(p)]
        others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in others[KEEP_RUNS - 1:]:
            _remove(old, strict=False)
        for legacy in _step_folders(self.directory):  # the flat layout of earlier versions
            _remove(legacy, strict=False)

    def _adopt_flat_layout(self) -> Path | None:
        """This run's checkpoints saved by an earlier version straight under ``directory`` (no run
        folder): moved into this run's folder so an upgrade does not lose a resumable run."""
        if self.directory is None or self.run_directory is None:
            return None
        mine = []
        for path in _step_folders(self.directory):
            try:
                if json.loads((path / "state.json").read_text()).get("fingerprint", "") == self.fingerprint:
                    mine.append(path)
            except (OSError, ValueError):
                continue
        if not mine:
            return None
        self.run_directory.mkdir(parents=True, exist_ok=True)
        for path in mine:
            os.replace(path, self.run_directory / path.name)
        return self.latest()

    def list(self) -> list[Path]:
        """This run's checkpoints, oldest first."""
        return _step_folders(self.run_directory) if self.run_directory is not None else []

    def clear(self) -> None:
        """Delete this run's checkpoints (``resume: false``); raise :class:`CheckpointDeleteError` if one stays.

        Only the main data-parallel process deletes (the training engine waits for it before resuming)."""
        if not distributed.is_main_process():
            return
        self._adopt_flat_layout()
        for path in self.list():
            _remove(path, strict=True)

    def verify(self, path: Path) -> dict[str, Any]:
        """Read ``state.json``, check it against its own checksum and its folder's step, and both
        tensor files against their recorded sha256."""
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as error:
            raise CorruptCheckpointError(f"Checkpoint '{path}' has no readable state.json ({error}).") from error
        remedy = f"delete '{path}' to resume from the previous checkpoint, or rerun from scratch"
        # Checkpoints of earlier versions have no checksum of their own; their tensor files are still checked.
        if STATE_CHECKSUM in state and state[STATE_CHECKSUM] != _state_digest(state):
            raise CorruptCheckpointError(f"Checkpoint file '{path / 'state.json'}' does not match its checksum "
                                         f"(changed since it was written); {remedy}.")
        step = state.get("step")
        if not isinstance(step, int) or path.name != f"step-{step:08d}":
            raise CorruptCheckpointError(f"Checkpoint '{path}' holds step {step!r}, not the step its folder names "
                                         f"(a checkpoint moved or copied over another); {remedy}.")
        for name, expected in state.get("sha256", {}).items():
            file = path / name
            if not file.is_file() or sha256_file(file) != expected:
                raise CorruptCheckpointError(
                    f"Checkpoint file '{file}' is missing or corrupted (checksum mismatch); delete "
                    f"'{path}' to resume from the previous checkpoint, or rerun from scratch."
                )
        return state

    def latest(self) -> Path | None:
        paths = self.list()
        return paths[-1] if paths else None

    def restore(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> Checkpoint | None:
        """Load the newest checkpoint into ``modules`` and ``optimizer``; None if there is none.

        A corrupted newest checkpoint is an error naming the file, never silently skipped.
        """
        path = self.latest() or self._adopt_flat_layout()
        if path is None:
            return None
        state = self.verify(path)
        if state.get("fingerprint", "") != self.fingerprint:  # copied in by hand: not this run's
            logger.warning("Checkpoint %s belongs to another run (different data or settings); starting afresh "
                           "without it.", path)
            return None
        weights = load_file(path / "weights.safetensors")
        for name, module in modules.items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
        _optimizer_from_flat(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
        logger.info("Resumed from checkpoint %s (step %d)", path, state["step"])
        return Checkpoint(step=state["step"], path=path, history=state["history"], extra=state["extra"])


def _remove(path: Path, strict: bool) -> None:
    """Delete a checkpoint folder; ``strict``: raise :class:`CheckpointDeleteError` naming it if it stays.

    The folder is first renamed out of the ``step-*`` namespace (atomic), so a process killed while
    deleting leaves a hidden leftover, never a half-deleted checkpoint that looks like one."""
    try:
        doomed = path.with_name(f".deleting-{path.name}-{os.getpid()}")
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    except FileNotFoundError:
        return
    except OSError as error:
        if strict:
            raise CheckpointDeleteError(
                f"Cannot delete old checkpoint folder '{path}' ({error.strerror or error}), so the run cannot start "
                "afresh as resume: false asks; delete it by hand (or fix its permissions) and run again."
            ) from error
        logger.warning("Could not delete old checkpoint folder %s (%s); delete it by hand.", path, error)
