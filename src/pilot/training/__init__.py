"""Training loops: the embedded base models, PILOT stage 1 and stage 2, and the baselines."""
