"""Interventions on the frozen student, as in pyvene / pyreft, and the one that injects guidance.

An :class:`Intervention` has a name and its sites (decoder layers). It is registered on the model
under its name, refuses to share a site with another one unless asked, and is removed with its
hooks on leaving its ``with`` block -- on success, pruning, a NaN stop or an error. The backbone's
weights are never touched. Every intervention is one: PILOT's and CAA's :class:`GuidanceInjector`
(adds nothing unless a :meth:`~GuidanceInjector.guide` block hands it vectors; can be switched
off), ReFT's edits (:meth:`pilot.baselines.reft.Reft.attached`) and the soft-token slots
(:class:`pilot.baselines.soft_tokens.SoftTokenSlots`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pilot.guidance.hypernet import HyperNetwork
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


class GuidanceInjector(Intervention):
    """Adds ``guidance_scale * rms(h) * g`` to the residual stream at decoder layer ``inject_layer``.

    Energy-aligned: the vector is scaled by the RMS norm of the hidden state it is added to,
    so ``||delta|| / ||h|| = guidance_scale * ||g|| / sqrt(d)`` whatever the layer's scale.
    With ``extra_layers`` each further site takes the next hidden-size slice of g. With
    ``modulation="film"`` each site's slice is a (scale, shift) pair:
    ``h <- h * (1 + guidance_scale * gamma) + guidance_scale * rms(h) * beta``.
    Attached on construction; use it as a context manager (or call :meth:`remove`) to detach.
    """

    def __init__(self, model: nn.Module, inject_layer: int, guidance_scale: float, *,
                 name: str = "pilot_guidance", allow_shared_site: bool = False,
                 extra_layers: list[int] | tuple[int, ...] = (), modulation: str = "add") -> None:
        super().__init__(model, name, [inject_layer, *extra_layers], allow_shared_site)
        self.inject_layer = inject_layer
        self.modulation = modulation
        self.guidance_scale = guidance_scale
        self.enabled = True
        self._vectors: torch.Tensor | None = None
        self._position_mask: torch.Tensor | None = None
        blocks = decoder_layers(model)
        for site, layer in enumerate(self.layers):
            self.hook(blocks[layer].register_forward_hook(lambda module, args, output, site=site:
                                                          self._hook(site, output)))

    def _site_vectors(self, site: int, hidden_size: int) -> torch.Tensor:
        """This site's part of g: (B, 1, d) to add, or (B, 2, d) scale and shift with FiLM."""
        parts = 2 if self.modulation == "film" else 1
        expected = len(self.layers) * parts * hidden_size
        if self._vectors.shape[-1] != expected:
            raise InterventionError(
                f"Guidance vectors of length {self._vectors.shape[-1]} do not fit '{self.name}': its "
                f"{len(self.layers)} site(s) with modulation '{self.modulation}' need {expected}.")
        return self._vectors.view(len(self._vectors), len(self.layers), parts, hidden_size)[:, site]

    def _hook(self, site: int, output):
        if self._vectors is None or not self.enabled:
            return None
        return with_hidden(output, self.apply(site, layer_hidden(output)))

    def apply(self, site: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` (B, T, d) at site ``site`` (an index into :attr:`layers`) with the current
        guidance added: what the site's hook returns. Unchanged outside a :meth:`guide` block.

        A pass that starts at the site from cached states (:mod:`pilot.guidance.prefix`) calls
        this where the hook would have fired."""
        if self._vectors is None or not self.enabled:
            return hidden
        vectors = self._site_vectors(site, hidden.shape[-1]).to(hidden.dtype)
        rms = hidden.detach().pow(2).mean(-1, keepdim=True).sqrt()
        delta = self.guidance_scale * rms * vectors[:, None, -1, :]
        if self.modulation == "film":
            delta = delta + self.guidance_scale * hidden * vectors[:, None, 0, :]
        if self._position_mask is not None:
            delta = delta * self._position_mask[..., None].to(device=hidden.device, dtype=hidden.dtype)
        return hidden + delta

    @contextmanager
    def guide(self, vectors: torch.Tensor | None, position_mask: torch.Tensor | None = None):
        """Inject ``vectors`` (one per batch row) while inside; ``position_mask`` (B, T) limits
        a full-sequence pass to the answer positions. ``None`` vectors guide nothing."""
        self.check_attached()
        previous = self._vectors, self._position_mask
        self._vectors, self._position_mask = vectors, position_mask
        try:
            yield self
        finally:
            self._vectors, self._position_mask = previous


@dataclass
class Guidance:
    """What to inject while generating: a hyper-network, or fixed vectors (one per prompt, or one for all)."""

    injector: GuidanceInjector
    hypernet: HyperNetwork | None = None
    vectors: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.hypernet is None) == (self.vectors is None):
            raise ValueError("Guidance needs exactly one of a hyper-network or explicit vectors.")


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
