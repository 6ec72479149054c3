"""A baseline trained on PILOT's protocol: everything it needs lives on its method class.

A :class:`TrainedBaseline` names its parameter block (``baselines.<name>``, validated by its
:attr:`~TrainedBaseline.params` class), the catalog entry it trains and is built from
(:attr:`~TrainedBaseline.artefact`), how that artefact is saved and loaded (safe files only), and
its :meth:`~TrainedBaseline.train` hook. The ``baselines`` pipeline has one node per registered
trained baseline, each calling that hook with the shared protocol inputs (the student, the guidance
settings whose hyper-network sets the parameter budget, the ``baselines`` block and
:class:`~pilot.training.protocol.TrainingProtocol`) plus whatever the method lists in
:attr:`~TrainedBaseline.train_inputs`; the catalog's ``{baseline}_artefact``, ``{baseline}_history`` and
``{baseline}_metrics`` patterns store the results. Its :meth:`~TrainedBaseline.check_against` hook
checks its settings against the student before a run computes anything. A new one is its module, its
parameter block in ``conf/base/parameters_baselines.yml`` and one line in :mod:`pilot.methods.registry`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from safetensors.torch import load_file, save_file
from torch import nn

from pilot.artifacts import atomic_folder, verify_folder
from pilot.config import BaselinesParams, GuidanceParams, Params, Stage1Params
from pilot.guidance import make_hypernet
from pilot.methods.base import Method, TrainingData
from pilot.models import CausalLM, count_parameters
from pilot.training.engine import TrainingResult
from pilot.training.protocol import TrainingProtocol

CONFIG, WEIGHTS = "config.json", "model.safetensors"
_KINDS: dict[str, type[TrainedModule]] = {}


class TrainedModule(nn.Module):
    """A baseline's trainable part, saved as ``config.json`` (``kind`` names the class; the rest rebuilds
    it) and ``model.safetensors``, written atomically with checksums; nothing is pickled. Subclasses set
    ``kind`` and define ``config`` / ``from_config``."""

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
    """The module saved at ``path`` (checksums verified), in eval mode on the CPU: any kind defined so far
    (a method's module registers its kinds; its method class loads its own artefact after it)."""
    path = Path(path)
    verify_folder(path, rebuild)
    config = json.loads((path / CONFIG).read_text())
    kind = config.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{path / CONFIG} names kind {kind!r}, not one of {sorted(_KINDS)}; rebuild it with `{rebuild}`.")
    module = _KINDS[kind].from_config(config)
    module.load_state_dict(load_file(path / WEIGHTS))
    return module.eval()

# What a train hook returns: the artefact, its per-step history rows (`val_accuracy` on the validated
# steps: TrainingResult.history_with_validation) and its summary metrics.
Trained = tuple[Any, list[dict[str, float]], dict[str, float]]


@dataclass(frozen=True)
class StudentShapes:
    """What a run's settings are checked against before any compute, read without loading weights:
    the student's depth and width, the hyper-network budget the baselines match, and, on demand, the
    student's modules on the meta device and the teacher's width (None where not known yet)."""

    num_layers: int
    hidden_size: int
    budget: int
    student_on_meta: Callable[[], Any | None]
    teacher_hidden_size: Callable[[], int | None]


@dataclass
class TrainedBaseline(Method):
    """A baseline trained on LoRA's protocol (``baselines.<name>``): its configured steps (stage 1's
    by default) on the training split. Subclasses list ``params:baselines`` and ``params:stage1``
    first in their inputs, then their :attr:`artefact` and anything else they are built from."""

    # Its parameter block's class (:attr:`Method.params`): the block is ``baselines.<name>`` and has a
    # ``training`` loop (:class:`~pilot.config.AdapterTrainingParams`).
    params: ClassVar[type[Params]]
    # The catalog entry it trains and is built from; ``<name>_artefact`` needs no catalog entry.
    artefact: ClassVar[str]
    # Catalog entries its training reads besides the shared ones (at most four: no node reads more than eight).
    train_inputs: ClassVar[tuple[str, ...]] = ()

    baselines: BaselinesParams
    stage1: Stage1Params

    @classmethod
    def check_against(cls, params: Params, shapes: StudentShapes) -> None:
        """Raise :class:`~pilot.config.ParameterError` (naming the setting and the fix) where ``params``
        cannot fit this student or the budget, so that a run fails before other nodes train, not after.
        By default there is nothing to check."""

    @classmethod
    def train(cls, student: CausalLM, guidance: GuidanceParams, params: Params, protocol: TrainingProtocol,
              *inputs: Any) -> Trained:
        """Train on ``protocol`` with its own ``params`` (and :attr:`train_inputs`, in order).

        Returns:
            the artefact, its per-step history rows and its summary metrics (logged under
            ``baselines.<name>.``).
        """
        raise NotImplementedError(f"{cls.__name__} is a trained baseline without a train hook.")

    @classmethod
    def save_artefact(cls, artefact: Any, path: Path) -> None:
        """Write ``artefact`` as a folder of safe files (safetensors and JSON, never a pickle), atomically
        with checksums (:func:`pilot.artifacts.atomic_folder`). By default it saves itself."""
        artefact.save(path)

    @classmethod
    def load_artefact(cls, path: Path, rebuild: str) -> Any:
        """What :meth:`save_artefact` wrote, checksums verified; by default a
        :class:`TrainedModule` folder."""
        return load_trained_module(path, rebuild)

    def comparable_settings(self, data: TrainingData) -> dict[str, Any]:
        training = self.own_params(self.baselines).training
        return {"training_steps": training.steps or self.stage1.training.steps,
                "training_data_rows": data.training_rows}


def hypernet_budget(student: CausalLM, guidance: GuidanceParams, seed: int) -> int:
    """The trainable parameters of the hyper-network ``guidance`` builds: the budget baselines match."""
    return count_parameters(make_hypernet(guidance, student.hidden_size, student.num_layers, seed))


def budget_metrics(num_parameters: int, budget: int, result: TrainingResult) -> dict[str, float]:
    """A trained module's size beside the hyper-network's budget, and the step its selection kept."""
    return {"hypernet_parameters": budget, "parameters": num_parameters, "budget_ratio": num_parameters / budget,
            "best_step": result.best_step, "best_val_accuracy": result.best_val_accuracy,
            "train_seconds": result.seconds}
