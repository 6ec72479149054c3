"""Training checkpoints that survive a SIGKILL: safetensors + JSON, written atomically.

A checkpoint is a folder ``step-00000120/`` holding ``weights.safetensors`` (the trained
modules), ``optimizer.safetensors`` (the optimizer's tensors) and ``state.json`` (the step,
the optimizer's scalar state, the loss history so far and a sha256 of both tensor files).
It is written to a temporary folder and renamed into place, so a run killed mid-write leaves
either the previous checkpoints or the new one, never half of one. Randomness in the trainers
is derived from (seed, step), so the step alone is enough to resume bit-for-bit.
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

logger = logging.getLogger(__name__)


class CorruptCheckpointError(RuntimeError):
    pass


def run_fingerprint(*parts: object) -> str:
    """Names a training run by what determines it (data, settings, starting weights): checkpoints
    of another run are never resumed."""
    payload = json.dumps([p.model_dump() if hasattr(p, "model_dump") else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    """Saves every ``every`` steps into ``directory``, keeps the newest ``keep``.

    ``fingerprint`` names the run (its data and configuration): checkpoints written under a
    different fingerprint belong to another run and are cleared instead of resumed.
    """

    def __init__(self, directory: str | Path | None, every: int, keep: int = 2, fingerprint: str = "") -> None:
        self.directory = Path(directory) if directory else None
        self.every = every
        self.keep = keep
        self.fingerprint = fingerprint

    @property
    def enabled(self) -> bool:
        return self.directory is not None and self.every > 0

    def due(self, step: int) -> bool:
        return self.enabled and step > 0 and step % self.every == 0

    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
             history: list[dict[str, float]], extra: dict[str, Any] | None = None) -> Path:
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step-{step:08d}"
        tmp = self.directory / f".tmp-step-{step:08d}-{os.getpid()}"
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
            "sha256": {name: _sha256(tmp / name) for name in ("weights.safetensors", "optimizer.safetensors")},
        }
        (tmp / "state.json").write_text(json.dumps(state))
        for file in tmp.iterdir():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.list()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def list(self) -> list[Path]:
        if self.directory is None or not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("step-"))

    def clear(self) -> None:
        for path in self.list():
            shutil.rmtree(path, ignore_errors=True)

    def verify(self, path: Path) -> dict[str, Any]:
        """Read ``state.json`` and check both tensor files against their recorded sha256."""
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as error:
            raise CorruptCheckpointError(f"Checkpoint '{path}' has no readable state.json ({error}).") from error
        for name, expected in state.get("sha256", {}).items():
            file = path / name
            if not file.is_file() or _sha256(file) != expected:
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
        path = self.latest()
        if path is None:
            return None
        state = self.verify(path)
        if state.get("fingerprint", "") != self.fingerprint:
            logger.info("Checkpoints in %s belong to another run (different data or settings); starting afresh.",
                        self.directory)
            self.clear()
            return None
        weights = load_file(path / "weights.safetensors")
        for name, module in modules.items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
        _optimizer_from_flat(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
        logger.info("Resumed from checkpoint %s (step %d)", path, state["step"])
        return Checkpoint(step=state["step"], path=path, history=state["history"], extra=state["extra"])
