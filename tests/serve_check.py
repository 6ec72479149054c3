"""End-to-end check of `mlflow models serve` for the logged PILOT: concurrent clients, big requests.

Run by hand after `kedro run --env test` (docs/serving.md), in the project folder that holds
``mlflow.db`` and ``data/``::

    python tests/serve_check.py --project . --workers 1
    python tests/serve_check.py --project . --workers 2

It serves the model named in ``data/08_reporting/trained_model.json`` on 127.0.0.1, answers
requests of 2, 3, 1 and 5 test questions one after another (the reference), then from 2 clients
x 20 requests at once (each client sends another size than the other), and checks every
concurrent answer against the reference; then a 1 MB question, which must be refused with a 400
in under a second. It prints one JSON line of measurements. The suite runs the same check
(tests/test_serving_limits.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

SIZES = (2, 3, 1, 5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, payload: object, timeout: float = 120) -> tuple[int, str]:
    """POST ``payload`` as JSON to /invocations; (status, body), errors included."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@contextmanager
def served(project: Path, workers: int, log_path: Path, env: dict[str, str] | None = None,
           start_timeout: float = 180) -> Iterator[int | None]:
    """`mlflow models serve` of the project's logged model on 127.0.0.1; yields its port (None if it
    did not start in time; the log is at ``log_path``). Stopped (its process group) on leaving."""
    info = json.loads((project / "data/08_reporting/trained_model.json").read_text())
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    env = {**(env or os.environ), "MLFLOW_TRACKING_URI": f"sqlite:///{project.resolve() / 'mlflow.db'}",
           "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}  # its uvicorn
    log = open(log_path, "wb")  # a file, not a pipe nobody drains
    server = subprocess.Popen([os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", info["model_uri"],
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
                              cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield port if _answers(server, f"http://127.0.0.1:{port}/ping", start_timeout) else None
    finally:
        stop(server, log)


def _answers(server: subprocess.Popen, url: str, timeout: float) -> bool:
    """Whether ``url`` answers 200 before ``timeout`` seconds pass or ``server`` exits."""
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    return False


def stop(server: subprocess.Popen, log) -> None:
    """Stop a server started in its own process group (SIGTERM, then SIGKILL) and close its log."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    log.close()


@contextmanager
def mlflow_ui(project: Path, log_path: Path, env: dict[str, str], start_timeout: float = 90) -> Iterator[int | None]:
    """The MLflow UI (`mlflow server`) on the project's SQLite store, on 127.0.0.1; yields its port (None
    if it did not start in time; the log is at ``log_path``). Stopped (its process group) on leaving."""
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    log = open(log_path, "wb")  # a file, not a pipe nobody drains
    server = subprocess.Popen([os.path.join(bin_dir, "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{project / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"],
                              cwd=project, env={**env, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])},
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield port if _answers(server, f"http://127.0.0.1:{port}/health", start_timeout) else None
    finally:
        stop(server, log)


def check(port: int, questions: list[str], clients: int = 2, per_client: int = 20) -> dict:
    """The measurements and findings described in the module docstring."""
    requests = [questions[i:i + size] for i, size in enumerate(SIZES)]
    reference = []
    for request in requests:
        status, text = post(port, {"inputs": request})
        if status != 200:
            raise AssertionError(f"a sequential request failed: {status} {text[:500]}")
        reference.append(json.loads(text)["predictions"])

    def client(offset: int, count: int) -> list[tuple[int, int, object]]:
        out = []
        for i in range(count):
            k = (offset + i) % len(requests)
            status, text = post(port, {"inputs": requests[k]})
            out.append((k, status, json.loads(text)["predictions"] if status == 200 else text[:300]))
        return out

    began = time.perf_counter()
    alone = client(0, per_client)
    alone_seconds = time.perf_counter() - began
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, c, per_client) for c in range(clients)]
        together = [row for future in futures for row in future.result()]
    together_seconds = time.perf_counter() - began

    def differing(rows):
        return [(k, status, answers) for k, status, answers in rows if (status, answers) != (200, reference[k])]

    began = time.perf_counter()
    status, text = post(port, {"inputs": ["9" * 1_000_000]}, timeout=60)
    refused_seconds = time.perf_counter() - began
    questions_alone = sum(len(requests[k]) for k, _, _ in alone)
    questions_together = sum(len(requests[k]) for k, _, _ in together)
    return {
        "requests_1_client": len(alone), f"requests_{clients}_clients": len(together),
        "differing_1_client": differing(alone)[:5], f"differing_{clients}_clients": differing(together)[:5],
        "questions_per_s_1_client": round(questions_alone / alone_seconds, 2),
        f"questions_per_s_{clients}_clients": round(questions_together / together_seconds, 2),
        "megabyte_status": status, "megabyte_seconds": round(refused_seconds, 3),
        "megabyte_body": json.loads(text) if text.startswith("{") else text[:300],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="folder with mlflow.db and data/")
    parser.add_argument("--workers", type=int, default=1, help="`mlflow models serve --workers`")
    parser.add_argument("--log", type=Path, default=Path("serve_check.log"), help="the server's output")
    args = parser.parse_args()
    questions = pd.read_parquet(args.project / "data/03_primary/tasks_test.parquet")["question"].tolist()
    with served(args.project, args.workers, args.log) as port:
        if port is None:
            sys.exit(f"`mlflow models serve` did not start; see {args.log}")
        result = check(port, questions)
    print(json.dumps({"workers": args.workers, **result}))
    ok = not result["differing_1_client"] and not result["differing_2_clients"] and result["megabyte_status"] == 400 and result["megabyte_seconds"] < 1.0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
