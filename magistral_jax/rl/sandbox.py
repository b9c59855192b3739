"""Running untrusted programs (code rewards) in a sandbox.

The design makes the known attacks impossible rather than patching each:

- The scorer never touches a path the program can influence. A program's stdin, stdout and stderr
  are anonymous memory files (`memfd_create`) made before it starts and handed over as file
  descriptors; sources go in the same way, before anything runs. The scorer reads the outputs
  from its own descriptors with a bound, and changes no ownership: nothing for a symlink, a hard
  link or a FIFO to redirect or block.
- The program sees only a minimal root (`sandbox_launch.py` builds it): read-only, nosuid views
  of /usr and the top-level library links (plus the Python installation when it lives elsewhere),
  /etc/ld.so.cache, a few device nodes, its box (the sources and the compiled program, read-only
  once tests run), and per run a fresh /proc of its own PID namespace and private /tmp, /dev/shm
  and /run/lock. Data files, the project tree, the installed package (masked where it lies under
  /usr), /etc/passwd, the network (a network namespace of its own) and every other process (a PID
  namespace of its own) are out of sight; SysV IPC objects live in an IPC namespace of the run.
- It runs as an unprivileged uid without capabilities (`no_new_privs`, nosuid mounts), under
  limits: address space, CPU and wall time, file size, processes, open files.
- Every wait is bounded, and everything a run started is gone when it returns: the run's test
  init is PID 1 of its namespace, and the kernel kills what is left when it exits. The whole
  sandbox dies with the scorer (PR_SET_PDEATHSIG chain scorer -> launcher -> init), also when
  the scorer is SIGKILLed.

Modes (chosen at start-up): as root, namespaces without a user namespace and a fresh unique uid
per sandbox; as an ordinary user, the same inside an unprivileged user namespace (the program's
uid maps to the user's own). Where the confinement cannot be built, `Sandbox()` raises
`SandboxUnavailable` naming the cause; untrusted code runs unconfined (limits only) only when
the user sets MAGISTRAL_SANDBOX=unconfined. The README's Reliability section says what this
relies on.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launch.py")
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODE_ENV = "MAGISTRAL_SANDBOX"
SYSTEM = "/usr"
TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SETUP_TIMEOUT = 30.0  # starting the launcher on a loaded machine
REPLY_GRACE = 3.0  # beyond a run's own time limit, for setting up and tearing down its namespaces
BOX_BYTES = 64 * 2**20


class SandboxUnavailable(OSError):
    """The confinement cannot be built on this machine (and unconfined runs were not asked for)."""


class SandboxError(OSError):
    """The sandbox itself failed during a run (not the program)."""


@dataclass(frozen=True)
class Limits:
    """Limits of one run (the paper's: 4 s and 300 MB per test)."""

    timeout: float = 4.0
    memory_mb: int = 300
    output_bytes: int = 16 * 2**20
    processes: int = 32
    open_files: int = 64


@dataclass(frozen=True)
class RunResult:
    ok: bool  # exited with status 0 within the limits
    reason: str | None  # why not
    stdout: str


def _interpreter() -> str:
    """The Python that runs programs: a system one when there is one (it is in /usr, which the
    sandbox shows), else this process's base interpreter (its installation is then shown)."""
    env = os.environ.get("MAGISTRAL_SANDBOX_PYTHON")
    if env:
        return os.path.realpath(env)
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate):
            return os.path.realpath(candidate)
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _layout(tools: Sequence[str]) -> dict:
    """What the sandbox's root shows: top-level links, read-only binds, masked directories."""
    tops = [p for p in TOP_LEVEL if os.path.islink(p)]
    binds = [SYSTEM] + [p for p in TOP_LEVEL if not os.path.islink(p) and os.path.isdir(p)]
    if os.path.isfile("/etc/ld.so.cache"):
        binds.append("/etc/ld.so.cache")
    for tool in tools:
        real = os.path.realpath(tool)
        if not any(_inside(real, b) for b in binds):
            binds.append(os.path.dirname(os.path.dirname(real)))  # its installation prefix
    hidden = {PACKAGE, os.path.realpath(os.getcwd())}
    if sys.prefix != sys.base_prefix:
        hidden.add(os.path.realpath(sys.prefix))  # a virtual environment
    masks = sorted(h for h in hidden if os.path.isdir(h) and any(_inside(h, b) and h != b for b in binds))
    return {"tops": tops, "binds": binds, "masks": masks}


def sandbox_mode() -> str:
    """`root`, `user` (an unprivileged user namespace) or `unconfined` (asked for explicitly)."""
    setting = os.environ.get(MODE_ENV, "")
    if setting == "unconfined":
        return "unconfined"
    if setting:
        raise ValueError(f"{MODE_ENV}={setting!r}: expected `unconfined` or unset")
    return "root" if os.geteuid() == 0 else "user"


def _userns_hint() -> str:
    """Which of the usual switches keeps unprivileged user namespaces off, if one does."""
    for path, off, fix in (
        ("/proc/sys/kernel/unprivileged_userns_clone", "0", "sysctl kernel.unprivileged_userns_clone=1"),
        (
            "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            "1",
            "sysctl kernel.apparmor_restrict_unprivileged_userns=0 (or an AppArmor profile allowing userns)",
        ),
        ("/proc/sys/user/max_user_namespaces", "0", "sysctl user.max_user_namespaces=10000"),
    ):
        try:
            with open(path) as f:
                if f.read().strip() == off:
                    return f"; unprivileged user namespaces are off here: {fix}, or run as root"
        except OSError:
            continue
    return ""


def _launcher_env() -> dict[str, str]:
    """The launcher's environment: nothing of the scorer's (secrets, data paths) that the
    sandbox's init would carry in its memory."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    if "LD_LIBRARY_PATH" in os.environ:  # some Python installations need it to start
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


_UNAVAILABLE: list[str] = []  # the reason, once found in this process
_WARNED: list[bool] = []


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


class Sandbox:
    """A confined box; `write` puts sources in it (before any run), `run` executes programs in it
    under `Limits`. `tools` are executables the programs need besides the system's (their
    installations are shown read-only)."""

    def __init__(self, tools: Sequence[str] = ()):
        self.mode = sandbox_mode()
        if self.mode != "unconfined" and _UNAVAILABLE:
            raise SandboxUnavailable(_UNAVAILABLE[0])
        if self.mode == "unconfined" and not _WARNED:
            _WARNED.append(True)
            print(
                f"WARNING: {MODE_ENV}=unconfined: untrusted code runs with resource limits only, "
                "seeing this machine's files, processes and network",
                file=sys.stderr,
            )
        self.python = _interpreter()
        setuid = os.geteuid() == 0
        self.uid = 100_000 + secrets.randbelow(1_000_000_000) if setuid else os.getuid()
        self._ran = False
        self._dead: str | None = None
        layout = _layout([self.python, *tools])
        # The root is built over /tmp and every run gets a /tmp of its own: nothing under it can be shown.
        under_tmp = [b for b in layout["binds"] if _inside(b, "/tmp")]
        if under_tmp and self.mode != "unconfined":
            raise SandboxError(
                f"sandbox: {under_tmp[0]} is under /tmp, which the sandbox replaces with its own; install "
                "the tools it runs (and the Python, MAGISTRAL_SANDBOX_PYTHON) outside /tmp"
            )
        self._ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._log = _memfd("sandbox-launcher")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", LAUNCHER, str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                cwd="/",
                env=_launcher_env(),
                start_new_session=True,
            )
        finally:
            theirs.close()
        setup = {"op": "setup", "mode": self.mode, "uid": self.uid, "setuid": setuid, "box_bytes": BOX_BYTES}
        setup.update(layout)
        self._ctl.send(json.dumps(setup).encode())
        reply = self._receive(SETUP_TIMEOUT)
        if reply is None or "error" in reply:
            why = reply["error"] if reply else self._launcher_output() or "the launcher did not answer"
            self.close()
            if self.mode == "unconfined":
                raise SandboxError(f"sandbox: cannot start: {why}")
            hint = _userns_hint() if self.mode == "user" else ""
            _UNAVAILABLE.append(
                f"sandbox: cannot confine untrusted code on this machine ({self.mode} mode: {why}){hint}; "
                f"set {MODE_ENV}=unconfined to run it with resource limits only (see README, Reliability)"
            )
            raise SandboxUnavailable(_UNAVAILABLE[0])
        self.box: str = reply["box"]

    def path(self, name: str) -> str:
        """Where `name` is, as the programs see it."""
        return os.path.join(self.box, name)

    def write(self, name: str, text: str) -> str:
        """Puts a file in the box; only before the first run (no program has touched it)."""
        if self._ran:
            raise ValueError("sandbox: files are written before any program runs")
        fd = _memfd(name, text.encode())
        try:
            socket.send_fds(self._ctl, [json.dumps({"op": "put", "name": name}).encode()], [fd])
        finally:
            os.close(fd)
        reply = self._receive(SETUP_TIMEOUT)
        if reply is None or "error" in reply:
            raise SandboxError(reply["error"] if reply else "sandbox: no answer to a file write")
        return self.path(name)

    def run(self, argv: list[str], stdin: str = "", limits: Limits | None = None, writable: bool = False) -> RunResult:
        """Runs `argv` with `stdin` as input. `writable`: the run may write into the box (a
        compiler); the first run without it makes the box read-only for good."""
        limits = limits or Limits()
        if self._dead:
            return RunResult(False, self._dead, "")
        self._ran = True
        streams = [_memfd("stdin", stdin.encode()), _memfd("stdout"), _memfd("stderr")]
        try:
            request = {
                "op": "run",
                "argv": list(argv),
                "cwd": "/tmp" if self.mode != "unconfined" else self.box,
                "timeout": limits.timeout,
                "memory": limits.memory_mb * 2**20,
                "cpu": int(limits.timeout) + 1,
                "fsize": limits.output_bytes,
                "nofile": limits.open_files,
                "nproc": limits.processes,
                "writable": writable,
            }
            socket.send_fds(self._ctl, [json.dumps(request).encode()], streams)
            reply = self._receive(limits.timeout + REPLY_GRACE)
            if reply is None or (reply.get("error") or "").startswith("sandbox: the run did not report"):
                # The program kept its namespace from ending in time: end the whole sandbox.
                self._dead = f"time limit: still running after {limits.timeout:g} s"
                self._kill()
                return RunResult(False, self._dead, "")
            stdout = os.pread(streams[1], limits.output_bytes, 0).decode(errors="replace")
            return RunResult(*self._verdict(reply, limits, streams[2]), stdout)
        finally:
            for fd in streams:
                os.close(fd)

    def _verdict(self, reply: dict, limits: Limits, stderr: int) -> tuple[bool, str | None]:
        error = reply.get("error")
        if error and error.startswith("sandbox:"):
            raise SandboxError(error)
        if error:
            return False, error[:300]
        if reply["timed_out"] or reply["elapsed"] > limits.timeout:
            return False, f"time limit: still running after {limits.timeout:g} s"
        if reply["signal"] is not None:
            return False, {
                signal.SIGXFSZ: f"output limit: more than {limits.output_bytes} bytes written",
                signal.SIGXCPU: f"time limit: more than {int(limits.timeout) + 1} s of CPU",
                signal.SIGKILL: "killed (time or memory limit)",
                signal.SIGSEGV: "crashed (segmentation fault; memory limit or bug)",
            }.get(reply["signal"], f"killed by signal {reply['signal']}")
        if reply["code"] != 0:
            return False, f"exited with status {reply['code']}: {_last_line(stderr)}"
        return True, None

    def _receive(self, timeout: float) -> dict | None:
        """The launcher's next answer, or None when it has none within `timeout` (or died)."""
        self._ctl.settimeout(timeout)
        try:
            data = self._ctl.recv(1 << 16)
        except OSError:  # socket.timeout is an OSError
            return None
        return json.loads(data) if data else None

    def _launcher_output(self) -> str:
        size = os.fstat(self._log).st_size
        text = os.pread(self._log, 2000, max(0, size - 2000)).decode(errors="replace").strip()
        return text.splitlines()[-1] if text else ""

    def _kill(self) -> None:
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)  # the launcher; init and the rest follow it
        except ProcessLookupError:
            pass
        self._proc.wait()

    def close(self) -> None:
        """Ends the sandbox: init sees the control socket close and exits, which ends every
        process in it; its file systems go with its mount namespace."""
        if self._ctl.fileno() < 0:
            return
        self._ctl.close()
        try:
            self._proc.wait(timeout=SETUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill()
        os.close(self._log)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _last_line(fd: int) -> str:
    """The last non-empty line of a program's stderr (read from the end, bounded)."""
    size = os.fstat(fd).st_size
    text = os.pread(fd, 1 << 16, max(0, size - (1 << 16))).decode(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[-300:] if lines else "(no error output)"
