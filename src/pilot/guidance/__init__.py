"""PILOT's guidance: the hyper-network, its injection into the frozen student, and the two together.

- :mod:`pilot.guidance.hypernet`: :class:`HyperNetwork` (what trains, saved on its own);
- :mod:`pilot.guidance.injection`: :class:`Intervention` (a named hook on the student, the base of
  every one), :class:`GuidanceInjector`, the one at PILOT's injection site, and :func:`capture_layers`;
- :mod:`pilot.guidance.student`: :class:`GuidedStudent`, the frozen student with the injector.
"""

from pilot.guidance.hypernet import HyperNetConfig, HyperNetwork, last_token_states, make_hypernet
from pilot.guidance.injection import (
    Guidance,
    GuidanceInjector,
    Intervention,
    InterventionError,
    capture_layers,
    interventions,
)
from pilot.guidance.student import GuidedStudent

__all__ = [
    "Guidance", "GuidanceInjector", "GuidedStudent", "HyperNetConfig", "HyperNetwork", "Intervention",
    "InterventionError", "capture_layers", "interventions", "last_token_states", "make_hypernet",
]
