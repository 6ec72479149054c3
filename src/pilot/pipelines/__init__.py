"""Kedro pipelines: thin nodes over the ``pilot`` library, wired through the catalog."""
