"""Sandbox launcher: builds the confinement, then runs programs in it on request (see sandbox.py).

Usage: python -I -S sandbox_launch.py CONTROL_FD SCORER_PID

Standalone on purpose: it imports only the standard library (everything before it drops the host's
file system), and never anything from the project.

Processes (confined modes; `unconfined` skips every namespace and mount):

    launcher   outside; unshares the user (as an ordinary user), mount, PID, IPC, UTS and network
      |        namespaces, forks init and waits for it; dies with the scorer (PR_SET_PDEATHSIG)
    init       PID 1 of the sandbox; builds the minimal root and pivots into it, then serves the
      |        scorer's requests on the control socket; dies with the launcher, and its death
      |        kills every process of the sandbox (the kernel tears a PID namespace down with it)
    test init  one per run: PID 1 of a fresh PID namespace with its own mount and IPC namespaces
      |        (fresh /proc, /tmp, /dev/shm, /run/lock; no SysV object of an earlier run); its
      |        exit after the program's ends the run and everything the program started
    program    the untrusted code: unprivileged uid, no capabilities, no_new_privs, rlimits

Requests (SOCK_SEQPACKET, one JSON object per message, file descriptors attached):
    {"op": "setup", ...}                -> {"ok": true, "box": DIR} | {"error": why}
    {"op": "put", "name": N} + [fd]     -> copies the file into the box (before any run)
    {"op": "run", ...} + [in, out, err] -> {"code", "signal", "timed_out", "elapsed", "error"}
Init answers each request; the scorer closing its end ends the sandbox.
"""

import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
# pivot_root has no glibc wrapper.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
# The mount flags a bind mount inherits and that an unprivileged remount must repeat
# (statvfs's ST_* bits equal the MS_* bits).
KEPT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048 | 4096  # + NOATIME, NODIRATIME, RELATIME
DEVICES = ("null", "zero", "full", "random", "urandom")
SANDBOX_UID = 1000  # the program's uid inside a user namespace
BOX = "/box"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}

libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def check(result: int, what: str) -> None:
    if result != 0:
        raise SetupError(f"{what}: {os.strerror(ctypes.get_errno())}")


def _c(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(libc.mount(_c(source), _c(target), _c(fstype), flags, _c(data)), f"mount {target}")


def bind_readonly(source: str, target: str) -> None:
    """A read-only, nosuid, nodev view of `source` at `target` (not recursive: no submount)."""
    mount(source, target, None, MS_BIND)
    kept = os.statvfs(source).f_flag & KEPT_FLAGS
    mount(None, target, None, MS_REMOUNT | MS_BIND | kept | MS_RDONLY | MS_NOSUID | MS_NODEV)


def make_point(path: str, like: str) -> None:
    """An empty directory or file at `path` to mount `like` on."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.isdir(like):
        os.makedirs(path, exist_ok=True)
    elif not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def lifeline(parent_alive_fd: int) -> None:
    """Dies with the parent: PR_SET_PDEATHSIG, and the parent's death before it took effect is
    seen as the end of the pipe the parent holds open."""
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if select.select([parent_alive_fd], [], [], 0)[0]:
        os._exit(0)


def build_root(cfg: dict) -> bool:
    """The sandbox's file system: a tmpfs holding read-only binds of the system directories the
    programs need, masks over the paths to hide, device nodes, a private /box; pivoted into and
    the host's tree detached. Returns whether /proc could be mounted."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back to the host
    # The new root's tmpfs goes on /tmp: every system has it, and nothing bound lives there.
    new = "/tmp"
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    for top in cfg["tops"]:  # /bin -> usr/bin and the like
        os.symlink(os.readlink(top), new + top)
    for path in cfg["binds"]:
        make_point(new + path, path)
        bind_readonly(path, new + path)
    for path in cfg["masks"]:
        mount("tmpfs", new + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,nr_inodes=16")
    os.makedirs(new + "/dev")
    mount("tmpfs", new + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=755")
    for name in DEVICES:
        make_point(f"{new}/dev/{name}", f"/dev/{name}")
        mount(f"/dev/{name}", f"{new}/dev/{name}", None, MS_BIND)
    for name, target in (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")):
        os.symlink("/proc/self/fd" + target, f"{new}/dev/{name}")
    for path in ("/dev/shm", "/tmp", "/run/lock", "/proc", BOX):
        os.makedirs(new + path, exist_ok=True)
    mount("tmpfs", new + BOX, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['box_bytes']},nr_inodes=1024,mode=755")
    os.chown(new + BOX, cfg["uid"], cfg["uid"])
    # A /proc of init's own PID namespace; it must exist before the host's is detached, since a
    # user namespace may only mount a procfs where one is already fully visible.
    try:
        mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        has_proc = True
    except SetupError:
        has_proc = False
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise SetupError(f"pivot_root: unsupported architecture {os.uname().machine}")
    os.chdir(new)
    check(libc.syscall(number, b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "detaching the host's file system")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return has_proc


def run_program(req: dict, fds: list[int], report: int, state: dict) -> None:
    """The program's process: standard streams, identity, limits, exec. Never returns."""
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target, inheritable=True)
        os.closerange(3, report)
        os.closerange(report + 1, 1 << 16)
        os.chdir(req["cwd"])
        if state["setuid"]:
            os.setgroups([])
            os.setgid(state["uid"])
            os.setuid(state["uid"])
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        limits = [
            (resource.RLIMIT_AS, req["memory"]),
            (resource.RLIMIT_CPU, req["cpu"]),
            (resource.RLIMIT_FSIZE, req["fsize"]),
            (resource.RLIMIT_NOFILE, req["nofile"]),
            (resource.RLIMIT_CORE, 0),
        ]
        if state["confined"] or state["setuid"]:
            # per uid: only meaningful where the uid is the sandbox's own
            limits.append((resource.RLIMIT_NPROC, req["nproc"]))
        for kind, value in limits:
            resource.setrlimit(kind, (value, value))
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them; an exec would inherit that
            signal.signal(sig, signal.SIG_DFL)
        os.execvpe(req["argv"][0], req["argv"], ENV)
    except BaseException as e:  # reported, then this process ends
        os.write(report, f"cannot run {req['argv'][0]}: {e}".encode()[:1000])
    os._exit(127)


def test_init(req: dict, fds: list[int], out: int, state: dict) -> None:
    """PID 1 of one run (confined) or the program's parent (unconfined): private mounts, the
    program, its wall-clock limit; writes the outcome to `out`. Never returns."""
    result = {"code": None, "signal": None, "timed_out": False, "elapsed": 0.0, "error": None}
    # No Python signal handler here: the kernel drops every signal a namespace's PID 1 does not
    # handle when it comes from inside (as an ordinary user the program has this process's uid).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        if state["confined"]:
            if state["proc"]:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            tmp = f"size={req['memory']},nr_inodes=4096,mode=1777"
            for path, data in (("/tmp", tmp), ("/dev/shm", tmp), ("/run/lock", "size=1m,nr_inodes=64,mode=1777")):
                mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, data)
            if state["ipc_limits"]:
                for name, value in (("shmmax", req["memory"]), ("shmall", req["memory"] // 4096), ("shmmni", 64)):
                    with open(f"/proc/sys/kernel/{name}", "w") as f:
                        f.write(str(value))
        errors_r, errors_w = os.pipe()
        os.set_inheritable(errors_w, False)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            if not state["confined"]:
                os.setsid()  # the run's processes are its process group
            run_program(req, fds, errors_w, state)
        os.close(errors_w)
        for fd in fds:
            os.close(fd)
        ended = os.pidfd_open(pid)
        status = None
        if select.select([ended], [], [], req["timeout"])[0]:
            _, status, _ = os.wait4(pid, 0)
        else:
            result["timed_out"] = True
        result["elapsed"] = time.monotonic() - start
        if status is not None:
            result["code"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            result["signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        # Written only when the exec failed; closed by a successful one (unless it is still under way).
        if select.select([errors_r], [], [], 0)[0] and (failure := os.read(errors_r, 1000)):
            result["error"] = failure.decode(errors="replace")
        if not state["confined"]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    except BaseException as e:  # reported to init
        result["error"] = f"sandbox: {e}"
    os.write(out, json.dumps(result).encode())
    os._exit(0)  # confined: the kernel now kills everything left in this PID namespace


def start_run(req: dict, fds: list[int], state: dict) -> tuple[int, int | None]:
    """Forks the run's test init (confined: in fresh PID, mount and IPC namespaces, through an
    intermediate process that exits at once); returns the read end of its report and its pid."""
    report_r, report_w = os.pipe()
    if not state["confined"]:
        pid = os.fork()
        if pid == 0:
            os.close(report_r)
            test_init(req, fds, report_w, state)
        os.close(report_w)
        return report_r, pid
    pid_r, pid_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(report_r)
        os.close(pid_r)
        try:
            check(libc.unshare(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC), "unshare (run)")
            child = os.fork()
            if child == 0:
                os.close(pid_w)
                test_init(req, fds, report_w, state)
            os.write(pid_w, child.to_bytes(4, "little"))
        except BaseException as e:  # reported to init
            os.write(report_w, json.dumps({"error": f"sandbox: {e}"}).encode())
        os._exit(0)
    os.close(report_w)
    os.close(pid_w)
    os.waitpid(middle, 0)  # the test init is now init's child (init is PID 1)
    head = os.read(pid_r, 4)
    os.close(pid_r)
    return report_r, int.from_bytes(head, "little") if len(head) == 4 else None


def serve_run(ctl: socket.socket, req: dict, fds: list[int], state: dict) -> dict:
    r, pid = start_run(req, fds, state)
    for fd in fds:
        os.close(fd)
    deadline = time.monotonic() + req["timeout"] + 2.0
    data = b""
    try:
        while True:
            left = deadline - time.monotonic()
            ready = select.select([r, ctl], [], [], max(left, 0))[0] if left > 0 else []
            if ctl in ready:
                # The scorer sends nothing while it waits: it went away. End the sandbox (the
                # kernel kills everything in it with init).
                os._exit(0)
            if r not in ready:
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                return {"error": "sandbox: the run did not report within its time limit"}
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        reap()
    try:
        return json.loads(data)
    except ValueError:
        # Confined, nothing the program does can end its run's init early; unconfined, it can.
        return {"error": ("sandbox: " if state["confined"] else "") + "the run ended without a report"}


def reap() -> None:
    """Waits for every child: as PID 1, init also inherits the test inits."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def put(req: dict, fds: list[int], state: dict) -> dict:
    if state["sealed"]:
        return {"error": "sandbox: files are written before any run"}
    name = req["name"]
    if "/" in name or name in ("", ".", ".."):
        return {"error": f"sandbox: bad file name {name!r}"}
    (src,) = fds
    dst = os.open(os.path.join(state["box"], name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        offset = 0
        while chunk := os.pread(src, 1 << 20, offset):
            os.write(dst, chunk)
            offset += len(chunk)
        if state["setuid"]:
            os.fchown(dst, state["uid"], state["uid"])
    finally:
        os.close(dst)
        os.close(src)
    return {"ok": True}


def seal(state: dict) -> None:
    """The box becomes read-only for every later run (after the compile, before the tests)."""
    if not state["sealed"]:
        if state["confined"]:
            mount(None, BOX, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        else:
            os.chmod(state["box"], 0o555)
        state["sealed"] = True


def serve(ctl: socket.socket, state: dict) -> None:
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(ctl, 1 << 16, 4)
        except OSError:
            return
        if not data:
            return
        req = json.loads(data)
        try:
            if req["op"] == "put":
                reply = put(req, fds, state)
            elif req["op"] == "run":
                if not req["writable"]:
                    seal(state)
                reply = serve_run(ctl, req, fds, state)
            else:
                reply = {"error": f"sandbox: unknown request {req['op']!r}"}
        except (OSError, SetupError) as e:
            reply = {"error": f"sandbox: {e}"}
        ctl.send(json.dumps(reply).encode())


def init_main(ctl: socket.socket, cfg: dict, alive: int) -> None:
    """PID 1 of the sandbox (or, unconfined, the launcher's child)."""
    lifeline(alive)
    os.close(alive)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the scorer ends the sandbox, not a terminal's Ctrl-C
    state = {
        "confined": cfg["mode"] != "unconfined",
        "setuid": cfg["setuid"],
        "uid": cfg["uid"],
        "sealed": False,
        "proc": False,
        "ipc_limits": False,
    }
    try:
        if state["confined"]:
            if os.getpid() != 1:
                raise SetupError("not PID 1 of a new PID namespace")
            state["proc"] = build_root(cfg)
            state["box"] = BOX
            # Only root of the user namespace owning the IPC namespace may set its limits.
            state["ipc_limits"] = state["proc"] and os.access("/proc/sys/kernel/shmmax", os.W_OK)
            libc.sethostname(b"sandbox", 7)
        else:
            import tempfile

            state["box"] = tempfile.mkdtemp(prefix="magistral-sandbox-")
            os.chmod(state["box"], 0o755)
            if state["setuid"]:
                os.chown(state["box"], cfg["uid"], cfg["uid"])
        os.close(os.pidfd_open(os.getpid()))  # runs are waited for through pidfds (Linux 5.3+)
        # Neither ptrace nor /proc/1/* for the programs (they run without capabilities).
        check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    except (OSError, SetupError) as e:
        ctl.send(json.dumps({"error": str(e)}).encode())
        os._exit(1)
    ctl.send(json.dumps({"ok": True, "box": state["box"], "proc": state["proc"]}).encode())
    try:
        serve(ctl, state)
    finally:
        if not state["confined"]:
            remove_tree(state["box"])
    os._exit(0)


def remove_tree(top: str) -> None:
    """Removes the unconfined box, which the seal (or the program) may have made read-only."""
    import shutil

    for root, _, _ in os.walk(top):
        try:
            os.chmod(root, 0o700)
        except OSError:
            pass
    shutil.rmtree(top, ignore_errors=True)


def write_map(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def main() -> None:
    ctl = socket.socket(fileno=int(sys.argv[1]))
    scorer = int(sys.argv[2])
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != scorer:
        os._exit(0)  # the scorer died before the line above
    data, _, _, _ = socket.recv_fds(ctl, 1 << 16, 0)
    cfg = json.loads(data)
    try:
        if cfg["mode"] != "unconfined":
            flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET
            if cfg["mode"] == "user":
                uid, gid = os.getuid(), os.getgid()
                check(libc.unshare(flags | CLONE_NEWUSER), "unshare")
                write_map("/proc/self/setgroups", "deny")
                write_map("/proc/self/uid_map", f"{SANDBOX_UID} {uid} 1")
                write_map("/proc/self/gid_map", f"{SANDBOX_UID} {gid} 1")
                cfg["uid"] = SANDBOX_UID
            else:
                check(libc.unshare(flags), "unshare")
    except (OSError, SetupError) as e:
        ctl.send(json.dumps({"error": str(e)}).encode())
        os._exit(1)
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        init_main(ctl, cfg, alive_r)
    os.close(alive_r)
    ctl.close()
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


main()
