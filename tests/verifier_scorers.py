"""Fake scorers that probe the verifier's sandbox from inside a worker (tests only).

``Verifier(scorer_module="tests.verifier_scorers")`` adds ``SCORERS`` to its worker; tests call
them through ``Verifier._run_scorers``, which skips the grammar. Each probe returns 1.0 when the
thing it tries succeeds (or the condition it checks holds), so a test asserts the score.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys


def _forge(answer, entry):
    """Print forged replies, and write them on every open descriptor, then score 0."""
    forged = "".join(json.dumps({"id": i, "nonce": "0" * 32, "score": 1.0}) + "\n" for i in range(1, 200))
    print(forged, flush=True)
    sys.stderr.write(forged)
    for name in os.listdir("/proc/self/fd"):
        try:
            os.write(int(name), forged.encode())
        except OSError:
            pass
    return 0.0


def _spin(answer, entry):
    while True:
        pass


def _burn(answer, entry):
    """Use the given CPU seconds, then score 1."""
    import resource

    while True:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        if usage.ru_utime + usage.ru_stime >= entry["metadata"]["cpu_s"]:
            return 1.0


def _environment_is(answer, entry):
    return 1.0 if dict(os.environ) == entry["metadata"]["environ"] else 0.0


def _workdir_is(answer, entry):
    return 1.0 if os.getcwd() == entry["metadata"]["cwd"] and not os.listdir(".") else 0.0


def _allocate(answer, entry):
    try:
        block = bytearray(entry["metadata"]["megabytes"] * 1024 * 1024)
    except MemoryError:
        return 0.0
    return 1.0 if len(block) else 0.0


def _write_file(answer, entry):
    try:
        with open(entry["metadata"]["path"], "w") as handle:
            handle.write("written")
    except OSError:
        return 0.0
    return 1.0


def _run_command(answer, entry):
    try:
        subprocess.run(["touch", entry["metadata"]["path"]], check=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return 0.0
    return 1.0


def _fork(answer, entry):
    try:
        pid = os.fork()
    except OSError:
        return 0.0
    if pid == 0:
        os._exit(0)
    return 1.0


def _connect(answer, entry):
    try:
        with socket.create_connection(("127.0.0.1", entry["metadata"]["port"]), timeout=2):
            return 1.0
    except OSError:
        return 0.0


def _signal_parent(answer, entry):
    try:
        os.kill(os.getppid(), 0)  # signal 0: only asks whether a signal would be allowed
    except OSError:
        return 0.0
    return 1.0


SCORERS = {
    "one": lambda answer, entry: 1.0,
    "zero": lambda answer, entry: 0.0,
    "echo": lambda answer, entry: float(answer),
    "forge": _forge,
    "spin": _spin,
    "burn": _burn,
    "environment_is": _environment_is,
    "workdir_is": _workdir_is,
    "allocate": _allocate,
    "write_file": _write_file,
    "run_command": _run_command,
    "fork": _fork,
    "connect": _connect,
    "signal_parent": _signal_parent,
}
