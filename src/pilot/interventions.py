"""Interventions on the frozen student, as in pyvene / pyreft: named hooks at sites.

A *site* is a decoder layer (or the input embeddings). An :class:`Intervention` has a name and its
sites; it is registered on the model under its name, refuses to share a site with another one
unless asked, and is removed with its hooks on leaving its ``with`` block -- on success, pruning, a
NaN stop or an error. The backbone's weights are never touched. Every edit of the student is one:
PILOT's and CAA's :class:`~pilot.guidance.injection.GuidanceInjector`, ReFT's edits, the
soft-token slots (:class:`pilot.soft_tokens.SoftTokenSlots`) and any method of your own. :func:`capture_layers` reads a site's hidden states.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from pilot.models import decoder_layers

_REGISTRY = "_pilot_interventions"


class InterventionError(RuntimeError):
    """Two interventions on one site (or one name), or an intervention used after removal."""


def interventions(model: nn.Module) -> dict[str, Intervention]:
    """The interventions attached to ``model``, by name."""
    return model.__dict__.setdefault(_REGISTRY, {})


def layer_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states in a decoder layer's output (a tensor, or a tuple that starts with them)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    """A decoder layer's output with its hidden states replaced: what a forward hook returns to edit them."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def check_site_free(model: nn.Module, name: str, layers: list[int] | tuple[int, ...],
                    allow_shared_site: bool = False) -> None:
    """Refuse a second intervention named ``name``, or one on a decoder layer another one holds.

    Every intervention (PILOT's injector, CAA's, ReFT's, the soft-token slots) registers under its
    name in :func:`interventions` with the ``layers`` it acts on.
    """
    attached = interventions(model)
    if name in attached:
        raise InterventionError(f"An intervention named '{name}' is already attached to this model; "
                                "remove it first (leave its `with` block) or choose another name.")
    count = len(decoder_layers(model))   # -1 and the last layer are one site
    held = {layer % count for other in attached.values() for layer in other.layers}
    shared = sorted(held & {layer % count for layer in layers})
    if shared and not allow_shared_site:
        sharing = [other.name for other in attached.values() if {layer % count for layer in other.layers} & set(shared)]
        raise InterventionError(
            f"Decoder layer {', '.join(map(str, shared))} already carries the intervention(s) {sharing}; "
            f"stacking '{name}' on it would add both. Remove the other first, or pass allow_shared_site=True."
        )


class Intervention:
    """A named intervention on ``model`` at decoder ``layers`` (none: the input embeddings).

    Registered in :func:`interventions` on construction (after :func:`check_site_free`); the hooks
    it adds with :meth:`hook` go with it when it is removed (:meth:`remove`, or leaving its ``with``
    block).
    """

    def __init__(self, model: nn.Module, name: str, layers: list[int] | tuple[int, ...] = (),
                 allow_shared_site: bool = False) -> None:
        check_site_free(model, name, layers, allow_shared_site)
        self.name = name
        self.layers = list(layers)
        self._model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        interventions(model)[name] = self

    def hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        """Keep a hook's handle: it is removed with the intervention."""
        self._handles.append(handle)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def check_attached(self) -> None:
        if not self.attached:
            raise InterventionError(f"The intervention '{self.name}' was removed; attach a new one.")

    def remove(self) -> None:
        """Detach from the model (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if interventions(self._model).get(self.name) is self:
            del interventions(self._model)[self.name]

    def __enter__(self) -> Intervention:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()



@contextmanager
def capture_layers(model: nn.Module, layers: list[int]):
    """Record the outputs of the given decoder layers during forward passes inside the block.

    Yields a dict that fills as the model runs: ``{layer: hidden states (B, T, d)}``.
    Registered after any injector, so a captured injected layer includes the guidance.
    """
    blocks = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer in sorted(set(layers)):
        def hook(module, args, output, layer=layer):
            captured[layer] = layer_hidden(output)
        handles.append(blocks[layer].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
