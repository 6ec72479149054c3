"""The intervention that injects guidance, PILOT's and CAA's: :class:`GuidanceInjector` (an
:class:`~pilot.interventions.Intervention` that adds nothing unless a
:meth:`~GuidanceInjector.guide` block hands it vectors; can be switched off), and :class:`Guidance`,
what generation injects (a hyper-network's vectors, or fixed ones).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pilot.guidance.hypernet import HyperNetwork
from pilot.interventions import Intervention, InterventionError, layer_hidden, with_hidden
from pilot.models import decoder_layers


class GuidanceInjector(Intervention):
    """Adds ``guidance_scale * rms(h) * g`` to the residual stream at decoder layer ``inject_layer``.

    Energy-aligned: the vector is scaled by the RMS norm of the hidden state it is added to,
    so ``||delta|| / ||h|| = guidance_scale * ||g|| / sqrt(d)`` whatever the layer's scale.
    With ``extra_layers`` each further site takes the next hidden-size slice of g. With
    ``modulation="film"`` each site's slice is a (scale, shift) pair:
    ``h <- h * (1 + guidance_scale * gamma) + guidance_scale * rms(h) * beta``.
    With ``scaling="none"`` the added part is not sized by ``rms(h)``: ``h + guidance_scale * g``,
    a plain bias (the bias-steering control). Attached on construction; use it as a context manager (or call :meth:`remove`) to detach.
    """

    def __init__(self, model: nn.Module, inject_layer: int, guidance_scale: float, *,
                 name: str = "pilot_guidance", allow_shared_site: bool = False,
                 extra_layers: list[int] | tuple[int, ...] = (), modulation: str = "add",
                 scaling: str = "rms") -> None:
        super().__init__(model, name, [inject_layer, *extra_layers], allow_shared_site)
        self.inject_layer = inject_layer
        self.modulation = modulation
        self.scaling = scaling
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
        if self.scaling == "none":
            delta = self.guidance_scale * vectors[:, None, -1, :]
        else:
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
