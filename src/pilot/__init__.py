"""PILOT: Planning via Internalized Latent Optimization Trajectories.

``pilot`` is a plain library (tasks, models, guidance, training, evaluation) that knows
nothing of Kedro; ``pilot.pipelines`` holds the thin Kedro nodes that drive it.
"""

__version__ = "0.1.0"
