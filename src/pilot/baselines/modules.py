"""What the trained baselines save: a small module, its weights in safetensors beside a JSON config.

A folder holds ``config.json`` (``kind`` names the class; the rest rebuilds it) and
``model.safetensors``, written atomically with checksums. :func:`load_trained_module` rebuilds any
kind; nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from safetensors.torch import load_file, save_file
from torch import nn

from pilot.artifacts import atomic_folder, verify_folder

CONFIG, WEIGHTS = "config.json", "model.safetensors"
_KINDS: dict[str, type[TrainedModule]] = {}


class TrainedModule(nn.Module):
    """A baseline's trainable part. Subclasses set ``kind`` and define ``config`` / ``from_config``."""

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        _KINDS[cls.kind] = cls

    @property
    def config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> TrainedModule:
        raise NotImplementedError

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str | Path) -> None:
        with atomic_folder(path) as folder:
            (folder / CONFIG).write_text(json.dumps(self.config, indent=2))
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, folder / WEIGHTS)


def load_trained_module(path: str | Path, rebuild: str = "kedro run --pipelines baselines") -> TrainedModule:
    """The module saved at ``path`` (checksums verified), in eval mode on the CPU."""
    from pilot.baselines import reft, soft_prompts  # noqa: F401  (importing them registers their kinds)

    path = Path(path)
    verify_folder(path, rebuild)
    config = json.loads((path / CONFIG).read_text())
    kind = config.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{path / CONFIG} names kind {kind!r}, not one of {sorted(_KINDS)}; rebuild it with `{rebuild}`.")
    module = _KINDS[kind].from_config(config)
    module.load_state_dict(load_file(path / WEIGHTS))
    return module.eval()
