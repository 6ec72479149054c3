"""PILOT's guidance: the hyper-network, its injection into the frozen student, and the two together.

- :mod:`pilot.guidance.hypernet`: :class:`HyperNetwork` (what trains, saved on its own);
- :mod:`pilot.guidance.injection`: :class:`GuidanceInjector`, the intervention
  (:mod:`pilot.interventions`) at PILOT's injection site, and :class:`Guidance`, what generation injects;
- :mod:`pilot.guidance.prefix`: the frozen prefix below the site, computed once;
- :mod:`pilot.guidance.student`: :class:`GuidedStudent`, the frozen student with the injector.
"""

from pilot.guidance.hypernet import HyperNetConfig, HyperNetwork, last_token_states, make_hypernet
from pilot.guidance.injection import Guidance, GuidanceInjector
from pilot.guidance.student import GuidedStudent

__all__ = ["Guidance", "GuidanceInjector", "GuidedStudent", "HyperNetConfig", "HyperNetwork", "last_token_states",
           "make_hypernet"]
