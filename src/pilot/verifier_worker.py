"""The verifier's scorer processes; only :class:`pilot.verifier.Verifier` starts them.

Two kinds of process live here.

The *zygote* (:func:`run_zygote`) is started once, with an empty environment, a fresh empty
working directory and stdin/stdout/stderr on /dev/null. Before it imports anything it moves
into a new user and network namespace where the OS allows it, so neither it nor any process it
forks has a network; then it imports reasoning-gym, warms every scorer once on reasoning-gym's
own gold answer, and from then on only forks workers when the parent asks. It never sees a
model answer.

A *worker* (:func:`_serve`) is a fork of the zygote, so replacing one after a timeout costs
milliseconds, not an interpreter start. Before it reads a request it locks itself down
(:func:`_lock_down`): resource limits (CPU seconds per answer, address space, open files, no
new processes, no core files, no file growth), no new privileges, Landlock (no file writes, no
program execution, no TCP, no signals or abstract sockets beyond itself) and a seccomp filter
(no fork, exec, sockets, ptrace, namespaces, mounts), each as far as the kernel offers it; it
reports what held in its first line. Requests arrive on one pipe and replies leave on another
that the scorers' stdout and stderr are not: every reply carries the request id and the nonce
the parent gave this worker, so a line forged by anything else in the process is discarded.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import platform
import resource
import signal
import socket
import struct
from collections.abc import Callable
from typing import Any

Scorer = Callable[[str, dict[str, Any]], float]

MAX_OPEN_FILES = 32
# Thread pools a numeric library would otherwise start in the zygote (a forked worker may not
# start threads); set only while reasoning-gym is imported, then cleared with the rest.
_SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2


def _os_error(what: str) -> str:
    return f"{what} refused ({os.strerror(ctypes.get_errno())})"


# ------------------------------------------------------------------ network namespace
def _leave_the_network() -> str:
    """Move into a new user + network namespace (only a downed loopback); say whether it held."""
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return "isolated: own network namespace with no interfaces up"
    return "not isolated: " + _os_error("unshare(CLONE_NEWUSER | CLONE_NEWNET)")


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(0)


# ------------------------------------------------------------------ Landlock
_LANDLOCK_CREATE_RULESET, _LANDLOCK_RESTRICT_SELF = 444, 446  # the same on every architecture


def _landlock_abi() -> int:
    abi = _libc.syscall(ctypes.c_long(_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(abi), 0)


def _restrict_with_landlock() -> str:
    """Deny every file write, program execution, TCP bind/connect and outside signal."""
    abi = _landlock_abi()
    if abi < 1:
        return "not applied: " + _os_error("Landlock")
    # Filesystem rights handled with no rule granting them: denied everywhere. Reading is not
    # handled, so imports keep working.
    fs = sum(1 << bit for bit in (0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # execute, write, remove, make
    fs |= (1 << 13) if abi >= 2 else 0  # refer (link/rename across directories)
    fs |= (1 << 14) if abi >= 3 else 0  # truncate
    net = 0b11 if abi >= 4 else 0       # bind and connect TCP
    scoped = 0b11 if abi >= 6 else 0    # abstract unix sockets and signals outside the sandbox
    attr = struct.pack("QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    buffer = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _libc.syscall(ctypes.c_long(_LANDLOCK_CREATE_RULESET), buffer, ctypes.c_size_t(len(attr)),
                            ctypes.c_uint32(0))
    if ruleset < 0:
        return "not applied: " + _os_error("landlock_create_ruleset")
    try:
        if _libc.syscall(ctypes.c_long(_LANDLOCK_RESTRICT_SELF), ctypes.c_long(ruleset), ctypes.c_uint32(0)) != 0:
            return "not applied: " + _os_error("landlock_restrict_self")
    finally:
        os.close(ruleset)
    held = ["no file writes", "no exec"] + (["no TCP"] if net else []) + (["no outside signals"] if scoped else [])
    return f"ABI {abi}: " + ", ".join(held)


# ------------------------------------------------------------------ seccomp
# x86_64 syscall numbers (asm/unistd_64.h) a scorer never needs; each fails with EPERM.
_DENIED_SYSCALLS_X86_64 = {
    "fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "execve": 59, "execveat": 322,
    "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438,
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
    "socket": 41, "socketpair": 53,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "unshare": 272, "setns": 308, "setsid": 112, "setpgid": 109,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249,
    "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320,
    "reboot": 169, "open_by_handle_at": 304, "name_to_handle_at": 303,
}


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _deny_syscalls() -> str:
    """Install a seccomp filter: the syscalls above, other ABIs and x32 calls fail with EPERM."""
    if platform.machine() != "x86_64":
        return f"not applied: the syscall table is written for x86_64, not {platform.machine()}"
    load_word, jump_equal, jump_at_least, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, RET|K
    numbers = sorted(_DENIED_SYSCALLS_X86_64.values())
    deny = 4 + len(numbers) + 1  # index of the EPERM return
    program = [
        (load_word, 0, 0, 4),                            # architecture
        (jump_equal, 0, deny - 2, 0xC000003E),           # AUDIT_ARCH_X86_64, else deny
        (load_word, 0, 0, 0),                            # syscall number
        (jump_at_least, deny - 4, 0, 0x40000000),        # x32 calls: deny
        *[(jump_equal, deny - (4 + i) - 1, 0, number) for i, number in enumerate(numbers)],
        (ret, 0, 0, 0x7FFF0000),                         # allow
        (ret, 0, 0, 0x00050000 | 1),                     # errno EPERM
    ]
    filters = (_SockFilter * len(program))(*[_SockFilter(*instruction) for instruction in program])
    fprog = _SockFprog(len(program), filters)
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        return "not applied: " + _os_error("seccomp")
    return f"{len(numbers)} syscalls denied (fork, exec, sockets, ptrace, signals, namespaces, mounts)"


# ------------------------------------------------------------------ the worker
def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _lock_down(config: dict[str, Any]) -> dict[str, Any]:
    """Apply every limit this process can take before any scorer runs; report what held.

    The resource limits must hold (a failure ends the worker before it serves); the kernel
    features are applied where the kernel offers them.
    """
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails instead of killing
    memory = config["memory_limit_mb"] * 1024 * 1024
    for limit, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_NPROC, 0),
                         (resource.RLIMIT_NOFILE, MAX_OPEN_FILES), (resource.RLIMIT_AS, memory)):
        resource.setrlimit(limit, (value, value))
    # CPU: a hard budget for this worker's life, a soft limit (SIGXCPU) reset before each answer.
    budget = int(_cpu_seconds()) + config["worker_cpu_budget_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (budget, budget))
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(_os_error("PR_SET_NO_NEW_PRIVS"))
    return {
        "rlimits": (f"cpu {config['cpu_limit_s']} s per answer, address space {config['memory_limit_mb']} MB, "
                    f"{MAX_OPEN_FILES} open files, 0 new processes, 0 core, 0 file size"),
        "landlock": _restrict_with_landlock(),
        "seccomp": _deny_syscalls(),
    }


def _write_line(fd: int, message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def _serve(request_fd: int, result_fd: int, nonce: str, config: dict[str, Any],
           scorers: dict[str, Scorer], network: str) -> None:
    sandbox = {"network": network, **_lock_down(config)}
    _write_line(result_fd, {"id": 0, "nonce": nonce, "ready": True, "sandbox": sandbox})
    budget = resource.getrlimit(resource.RLIMIT_CPU)[1]
    with os.fdopen(request_fd, "rb") as requests:
        for line in requests:
            request = json.loads(line)
            resource.setrlimit(resource.RLIMIT_CPU, (min(budget, int(_cpu_seconds()) + config["cpu_limit_s"]), budget))
            try:
                score = float(scorers[request["task"]](request["answer"], request["entry"]))
            except BaseException:  # noqa: BLE001 - any failure to score is a wrong answer
                score = 0.0
            # A worker near the end of its CPU budget says so and exits; the parent starts another.
            retire = _cpu_seconds() + config["cpu_limit_s"] >= budget
            _write_line(result_fd, {"id": request["id"], "nonce": nonce, "score": score, "retire": retire})
            if retire:
                return


# ------------------------------------------------------------------ the zygote
def _load_scorers(tasks: list[str], scorer_module: str | None) -> dict[str, Scorer]:
    import reasoning_gym

    scorers: dict[str, Scorer] = {task: reasoning_gym.get_score_answer_fn(task) for task in tasks}
    for task, score in scorers.items():
        # Warm each scorer once on its own gold answer, so sympy's lazy imports and caches are
        # paid here and not again in every worker.
        try:
            entry = reasoning_gym.create_dataset(task, seed=0, size=1)[0]
            score(entry["answer"], entry)
        except Exception:  # noqa: BLE001 - warming is an optimisation only
            pass
    if scorer_module:  # tests only: fake scorers that probe the sandbox
        scorers.update(importlib.import_module(scorer_module).SCORERS)
    return scorers


def _send(control: socket.socket, message: dict[str, Any]) -> None:
    control.send(json.dumps(message).encode())


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def run_zygote(control_fd: int, config_json: str) -> None:  # pragma: no cover - runs in a subprocess
    """Serve the parent's spawn requests on ``control_fd`` until the parent goes away."""
    control = socket.socket(fileno=control_fd)
    config = json.loads(config_json)
    try:
        network = _leave_the_network()
        _die_with_parent()
        os.environ.update(_SINGLE_THREADED)
        scorers = _load_scorers(config["tasks"], config.get("scorer_module"))
        # Started with none; this also drops the LC_CTYPE the interpreter adds (PEP 538).
        os.environ.clear()
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises
        _send(control, {"error": f"{type(error).__name__}: {error}"})
        return
    _send(control, {"ready": True})
    while True:
        message, fds, _, _ = socket.recv_fds(control, 65536, 2)
        if not message:
            return
        _reap()
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                control.close()
                _die_with_parent()
                _serve(fds[0], fds[1], request["nonce"], config, scorers, network)
                status = 0
            finally:
                os._exit(status)
        for fd in fds:
            os.close(fd)
        _send(control, {"pid": pid})
