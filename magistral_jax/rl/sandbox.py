"""Running untrusted programs (code rewards) in a sandbox.

Each program runs in a new session (so a timeout kills the whole process group) through a small
launcher (`sandbox_launch.py`, run by a Python that any user can execute) that, before `exec`:
- when the caller is root: moves into a new network namespace (no network at all) and drops to
  a fresh, unique, unprivileged uid/gid (so the process limit is enforced, nothing the host owns
  is writable, and every process it left behind can be killed by uid);
- sets resource limits: address space, CPU time, file size, number of processes and open files.

The program runs in a private temporary directory (its HOME and TMPDIR), reads its input from a
file and writes its output to one. Afterwards every process of the sandbox uid is killed, and
every file it created in the world-writable directories (/tmp, /var/tmp, /dev/shm) is removed with
the private directory. Without root the limits still apply but network isolation, the process
limit and the by-uid clean-up do not (`Sandbox.isolated` says which).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Run as the sandbox uid: kill every process of the uid until none is left (survivors of one
# round may have forked). kill(-1) reports success whenever any other process exists, so the
# check is a scan of /proc.
_REAPER = """
import os, signal, time
os.setgroups([]); os.setgid({uid}); os.setuid({uid})
def left():
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                if os.stat("/proc/" + pid).st_uid == {uid}:
                    found.append(pid)
            except OSError:
                pass
    return found
for _ in range(400):
    if not left():
        break
    os.kill(-1, signal.SIGKILL)
    time.sleep(0.005)
"""
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launch.py")
SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")


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
    """A Python any user can execute (the sandbox drops privileges before exec)."""
    env = os.environ.get("MAGISTRAL_SANDBOX_PYTHON")
    if env:
        return env
    if os.geteuid() == 0:
        for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
            if os.path.exists(candidate):
                return candidate
    return sys.executable


class Sandbox:
    """A private directory and a unique uid; `run` executes programs in it under `Limits`."""

    def __init__(self):
        self.isolated = os.geteuid() == 0
        self.python = _interpreter()
        self.uid = 100_000 + secrets.randbelow(1_000_000_000) if self.isolated else os.getuid()
        self.dir = tempfile.mkdtemp(prefix="magistral-sandbox-")
        os.chmod(self.dir, 0o700)
        if self.isolated:
            os.chown(self.dir, self.uid, self.uid)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def write(self, name: str, text: str) -> str:
        path = self.path(name)
        with open(path, "w") as f:
            f.write(text)
        if self.isolated:
            os.chown(path, self.uid, self.uid)
        return path

    def run(self, argv: list[str], stdin: str = "", limits: Limits | None = None) -> RunResult:
        """Runs `argv` in the sandbox with `stdin` as input."""
        limits = limits or Limits()
        stdin_path = self.write(".stdin", stdin)
        out_path, err_path = self.path(".stdout"), self.path(".stderr")
        for path in (out_path, err_path):
            if os.path.exists(path):
                os.unlink(path)
        launcher = [
            self.python,
            "-I",
            "-S",
            LAUNCHER,
            str(self.uid if self.isolated else -1),
            self.dir,
            str(limits.memory_mb * 2**20),
            str(int(limits.timeout) + 1),
            str(limits.output_bytes),
            str(limits.processes),
            str(limits.open_files),
            stdin_path,
            out_path,
            err_path,
            "--",
            *argv,
        ]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.dir, "TMPDIR": self.dir, "LANG": "C.UTF-8"}
        start = time.monotonic()
        proc = subprocess.Popen(
            launcher,
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        reason = None
        try:
            _, launch_err = proc.communicate(timeout=limits.timeout + 1.0)
        except subprocess.TimeoutExpired:
            self._kill_group(proc)
            proc.communicate()
            launch_err = b""
            reason = f"time limit: still running after {limits.timeout:g} s"
        finally:
            self._reap()
        elapsed = time.monotonic() - start
        if reason is None and elapsed > limits.timeout:
            reason = f"time limit: {elapsed:.1f} s > {limits.timeout:g} s"
        code = proc.returncode
        if reason is None and code != 0:
            if launch_err:
                reason = f"sandbox: {launch_err.decode(errors='replace').strip()[-300:]}"
            elif code < 0:
                reason = {
                    signal.SIGXFSZ: f"output limit: more than {limits.output_bytes} bytes written",
                    signal.SIGXCPU: f"time limit: more than {int(limits.timeout) + 1} s of CPU",
                    signal.SIGKILL: "killed (time or memory limit)",
                    signal.SIGSEGV: "crashed (segmentation fault; memory limit or bug)",
                }.get(-code, f"killed by signal {-code}")
            else:
                reason = f"exited with status {code}: {self._tail(err_path)}"
        return RunResult(reason is None, reason, self._read(out_path, limits.output_bytes))

    def _read(self, path: str, limit: int) -> str:
        try:
            with open(path, "rb") as f:
                return f.read(limit).decode(errors="replace")
        except OSError:
            return ""

    def _tail(self, path: str) -> str:
        lines = [line for line in self._read(path, 1 << 20).splitlines() if line.strip()]
        return lines[-1].strip()[-300:] if lines else "(no error output)"

    def _kill_group(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        """Kills every process of the sandbox uid (children that left the process group too)."""
        if not self.isolated:
            return
        subprocess.run(
            [
                self.python,
                "-I",
                "-S",
                "-c",
                _REAPER.format(uid=self.uid),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )

    def close(self) -> None:
        """Kills what is left, removes the private directory and the uid's files elsewhere."""
        self._reap()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.isolated:
            for top in SHARED_TMP:
                _remove_owned(top, self.uid)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _remove_owned(top: str, uid: int) -> None:
    """Removes everything under `top` owned by `uid`, descending only into directories that a
    stranger could write to (nothing else can hold the uid's files)."""
    try:
        entries = list(os.scandir(top))
    except OSError:
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if st.st_uid == uid:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass
        elif stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH:
            _remove_owned(entry.path, uid)
