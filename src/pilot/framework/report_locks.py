"""Parallel tune workers in one checkout write the same report files (``tune*``) and upload each to
MLflow; every such save holds one exclusive file lock, so no worker uploads a file another is rewriting
(that sends a torn request, which the tracking server answers with a 400)."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl


class SharedReportHooks:
    """One exclusive lock around each save of a ``tune*`` dataset, shared by every process of the checkout.

    A thread lock in front of the file lock serialises this process's own saves too (``kedro run
    --async`` saves a node's outputs in threads), so each save holds the file lock alone.
    """

    LOCK_NAME = ".tune-reports.lock"

    def __init__(self) -> None:
        self._lock_path: Path | None = None
        self._in_process = threading.Lock()
        self._held: dict[str, Any] = {}

    @hook_impl
    def after_context_created(self, context) -> None:
        data_root = context.config_loader["globals"].get("data_root", "data")
        self._lock_path = Path(context.project_path) / data_root / "08_reporting" / self.LOCK_NAME

    @hook_impl
    def before_dataset_saved(self, dataset_name: str) -> None:
        if self._lock_path is None or not dataset_name.startswith("tune"):
            return
        self._in_process.acquire()
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        held = open(self._lock_path, "a")  # closed in after_dataset_saved, or when the process ends
        fcntl.flock(held, fcntl.LOCK_EX)
        self._held[dataset_name] = held

    @hook_impl
    def after_dataset_saved(self, dataset_name: str) -> None:
        held = self._held.pop(dataset_name, None)
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_UN)
            held.close()
            self._in_process.release()
