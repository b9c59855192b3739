"""Hostile code completions: no reward, nothing read or changed outside, nothing left behind.

Each attacking program prints the right answer only if its attack works (or, where the attack is
on the scorer itself, solves the task honestly while attacking, and the verdict must survive), so
only the sandbox stands between it and the reward. As root the sandbox builds its namespaces
directly and runs programs under a fresh uid; `test_attacks_as_an_ordinary_user` repeats the
attacks as an unprivileged user (an unprivileged user namespace, the user's own uid).
"""

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import magistral_jax
from magistral_jax.rl import magistral_rewards
from magistral_jax.rl.magistral_rewards import code_correct, magistral
from magistral_jax.rl.pool import RewardPool
from magistral_jax.rl.sandbox import Limits, Sandbox, SandboxError, sandbox_mode

# As root the sandbox's uid is one of its own, so "nothing left" can be checked by uid; the
# unprivileged mode is tested from root too, as `nobody`.
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="run as root: leftovers are found by the sandbox's uid; `nobody` is run via setpriv"
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(magistral_jax.__file__)))
BUNDLED_CODE = os.path.join(os.path.dirname(magistral_jax.__file__), "data", "bundled", "python_tasks.jsonl")
SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
TESTS = [{"input": "2 3\n", "output": "5\n"}]
SOLVE = "a, b = map(int, input().split())\nprint(a + b)\n"
MARK = uuid.uuid4().hex
SECRET = f"secret-{uuid.uuid4().hex}"
BOUND = 30.0  # seconds any one scoring may take here (a loaded 2-core machine); a hang fails the test

HOSTILE = {
    "loops forever": ("while True:\n    pass\n", "time limit"),
    "allocates without bound": ("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", "MemoryError"),
    # Killed by the process limit, or on a loaded machine by the time limit first.
    "forks repeatedly": ("import os\nwhile True:\n    os.fork()\n", ("status", "time limit")),
    "escapes its session": (
        # a child that leaves the process group and outlives the parent
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n",
        None,
    ),
    "writes outside its directory": (
        f"open({ROOT!r} + '/escape-{MARK}', 'w').write('x')\n",
        ("FileNotFoundError", "PermissionError"),
    ),
    "writes to /tmp": (f"open('/tmp/escape-{MARK}', 'w').write('x')\nopen('/dev/shm/escape-{MARK}', 'w')\n", None),
    "opens a socket": (
        "import socket\nsocket.create_connection(('93.184.216.34', 80), timeout=2)\n",
        "Network is unreachable",
    ),
    "prints gigabytes": ("import sys\nwhile True:\n    sys.stdout.write('x' * 2**20)\n", "File too large"),
}


def uid_processes(uid: int) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    if any(line.split()[1] == str(uid) for line in f if line.startswith("Uid:")):
                        found.append(pid)
            except OSError:
                continue
    return found


def uid_files(uid: int) -> list[str]:
    """Files of `uid` in the shared directories (it can only write where strangers may, or into
    directories it made there)."""
    found = []
    for top in SHARED_TMP:
        for root, dirs, files in os.walk(top):
            keep = []
            for name in dirs + files:
                try:
                    st = os.lstat(os.path.join(root, name))
                except OSError:
                    continue
                if st.st_uid == uid:
                    found.append(os.path.join(root, name))
                elif name in dirs and st.st_mode & stat.S_IWOTH:
                    keep.append(name)
            dirs[:] = keep
    return found


def uid_shm(uid: int) -> list[str]:
    """SysV shared-memory segments of `uid` in this (the host's) IPC namespace."""
    with open("/proc/sysvipc/shm") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return [row[1] for row in rows if row[7] == str(uid)]


def processes() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, start time, uid) of every process."""
    table = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                uid = os.stat(f"/proc/{pid}").st_uid
            except OSError:
                continue
            table[int(pid)] = (int(fields[1]), fields[19], uid)
    return table


def descendants(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process below `root`."""
    table = processes()
    found, frontier = set(), {root}
    while frontier:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier}
        found |= {(pid, table[pid][1]) for pid in children}
        frontier = children
    return found


def owned_by(uid: int) -> set[tuple[int, str]]:
    return {(pid, start) for pid, (_, start, owner) in processes().items() if owner == uid}


def wait_until_gone(procs: set[tuple[int, str]], seconds: float = 5.0) -> set[tuple[int, str]]:
    deadline = time.monotonic() + seconds
    while True:
        table = processes()
        alive = {(pid, start) for pid, start in procs if pid in table and table[pid][1] == start}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@contextlib.contextmanager
def bounded(seconds: float = BOUND):
    """Fails the test when the block takes longer (a hung scorer)."""

    def expire(signum, frame):
        raise TimeoutError(f"scoring still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def boxes(monkeypatch):
    """The sandboxes the code reward makes; afterwards, nothing of theirs may be left."""
    made = []

    class Recorded(Sandbox):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(magistral_rewards, "Sandbox", Recorded)
    yield made
    assert wait_until_gone(descendants(os.getpid())) == set()
    for box in made:
        assert uid_processes(box.uid) == [] and uid_files(box.uid) == [] and uid_shm(box.uid) == []


@pytest.fixture
def host(tmp_path):
    """Files only root may read or run, and a snapshot to prove them untouched."""
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    script = tmp_path / "root-only.sh"
    script.write_text("#!/bin/sh\necho original\n")
    script.chmod(0o700)

    def snapshot():
        return {p: (p.read_bytes(), p.stat().st_mode, p.stat().st_uid) for p in (secret, script)}

    before = snapshot()
    yield {"secret": str(secret), "script": str(script), "dir": str(tmp_path)}
    assert snapshot() == before


@pytest.fixture
def public(tmp_path):
    """A world-readable directory (pytest's own are root-only): what a data directory or a
    project checkout usually is."""
    path = os.path.join("/tmp", f"magistral-public-{uuid.uuid4().hex}")
    os.makedirs(path)
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def python_answer(program: str) -> str:
    return f"Solution:\n```python\n{program}```"


def score(program: str, tests, language: str = "python", **kw) -> tuple[bool, str | None]:
    with bounded():
        ok, reason = code_correct(f"```{language}\n{program}```", tests, seed=0, **kw)
    assert SECRET not in (reason or "")
    return ok, reason


def steal(paths: list[str]) -> str:
    """Prints the first of `paths` it can read: directly, through every process's root and cwd in
    /proc, by a hard link, or by a symlink."""
    return textwrap.dedent(f"""
        import os, sys
        found = []
        pids = [p for p in os.listdir("/proc") if p.isdigit()] + ["self", "self/..", "1"]
        for path in {paths!r}:
            candidates = [path] + [f"/proc/{{p}}/{{where}}{{path}}" for p in pids for where in ("root", "cwd/..")]
            for i, c in enumerate(candidates):
                for how in ("open", "link", "symlink"):
                    try:
                        if how == "open":
                            found.append(open(c).read())
                        else:
                            alias = f"/tmp/alias-{{how}}-{{i}}"
                            (os.link if how == "link" else os.symlink)(c, alias)
                            found.append(open(alias).read())
                    except (OSError, ValueError):
                        pass
        print(found[0] if found else "nothing", end="")
    """)


def look_up(explicit: list[str]) -> str:
    """Finds the expected output of its input in any problem file it can name: `explicit` paths,
    and every path in the command lines, environments, working directories and open files of the
    processes it sees."""
    return textwrap.dedent(f"""
        import json, os, sys
        wanted = sys.stdin.read()
        paths = list({explicit!r})
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            base = "/proc/" + pid
            for part in ("cmdline", "environ"):
                try:
                    words = open(base + "/" + part, "rb").read().split(b"\\0")
                except OSError:
                    continue
                for word in words:
                    text = word.decode(errors="replace").split("=", 1)[-1]
                    paths += [text, base + "/cwd/" + text, base + "/root/" + text]
            try:
                paths += [base + "/fd/" + fd for fd in os.listdir(base + "/fd")]
            except OSError:
                pass
        for path in paths:
            try:
                lines = open(path, errors="replace").read(1 << 20).splitlines()
            except (OSError, ValueError):
                continue
            for line in lines:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                for test in row.get("tests") or [] if isinstance(row, dict) else []:
                    if isinstance(test, dict) and test.get("input") == wanted:
                        print(test["output"], end="")
                        sys.exit(0)
        print("not found")
    """)


def plant(kind: str) -> str:
    """Replaces the standard stream files a scorer might reopen (in every directory the program
    can write) by symlinks to `HOST` or by FIFOs, then solves the task; on a later test it tries
    to write `HOST` (which a scorer that followed the links would have handed over)."""
    return textwrap.dedent(f"""
        import os, sys
        for d in {{os.getcwd(), os.path.dirname(os.path.abspath(sys.argv[0])), "/tmp", os.environ.get("HOME", "/tmp")}}:
            for name in (".stdin", ".stdout", ".stderr", "stdin", "stdout", "stderr", "main.py", "main"):
                path = os.path.join(d, name)
                try:
                    if os.path.lexists(path):
                        os.unlink(path)
                    os.mkfifo(path) if {kind!r} == "fifo" else os.symlink(HOST, path)
                except OSError:
                    pass
        try:
            with open(HOST, "a") as f:
                f.write("pwned")
            print("escaped")
        except OSError:
            pass
    """)


def test_attack_rewriting_a_root_owned_file_through_the_streams(host, boxes):
    # The scorer once wrote the next test's input into a symlink planted in place of the stdin
    # file and handed it to the sandbox uid. The program solves the task (so only the escape
    # could change the verdict) and, from the second test on, tries to write the root-only script.
    program = f"HOST = {host['script']!r}\n" + plant("symlink") + SOLVE
    assert score(program, TESTS * 3) == (True, None)


def test_attack_blocking_the_scorer_with_fifos(host, boxes):
    start = time.monotonic()
    program = f"HOST = {host['script']!r}\n" + plant("fifo") + SOLVE
    assert score(program, TESTS * 3) == (True, None)
    assert time.monotonic() - start < BOUND


def test_attack_reading_root_only_files_through_the_streams(host, boxes):
    # A symlink from the stderr / stdout files to a root-only file once put that file into the
    # reason (the program exits with an error) or into the program's output (the expected one here).
    for exit_code in (1, 0):
        program = f"HOST = {host['secret']!r}\n" + plant("symlink") + f"raise SystemExit({exit_code})\n"
        ok, reason = score(program, [{"input": "x\n", "output": SECRET + "\n"}] * 2)
        assert not ok and ("status 1" in reason if exit_code else "wrong output" in reason)


@pytest.mark.parametrize("target", ["secret", "passwd", "bundled problems", "project tree"])
def test_attack_reading_host_files(target, host, boxes):
    paths = {
        "secret": host["secret"],
        "passwd": "/etc/passwd",
        "bundled problems": BUNDLED_CODE,
        "project tree": os.path.join(ROOT, "pyproject.toml"),
    }
    path = paths[target]
    with open(path) as f:
        expected = f.read()  # what the program prints if it can read the file
    ok, reason = score(steal([path]), [{"input": "\n", "output": expected}])
    assert not ok and reason.endswith("wrong output")


def test_attack_looking_up_the_expected_output_in_the_bundled_problem_set(boxes):
    with open(BUNDLED_CODE) as f:
        tests = json.loads(f.readline())["tests"][:2]
    # the program finds its input in the bundled file (named directly, and relative to the
    # launcher's path in /proc/1/cmdline) and prints the output stored beside it
    cheat = look_up([BUNDLED_CODE, "magistral_jax/data/bundled/python_tasks.jsonl"])
    ok, reason = score(cheat, tests)
    assert not ok and "wrong output" in reason


def test_attack_reading_the_data_file_named_in_the_scorers_command_line(public):
    # `magistral-jax score --data /abs/problems.jsonl --completions completions.jsonl`, run from the
    # data's directory: the program looks for the file in every command line, environment, working
    # directory and open file it can see, and the expected output exists nowhere else.
    tests = [{"input": f"token-{MARK}\n", "output": f"{SECRET}\n"}]
    with open(os.path.join(public, "problems.jsonl"), "w") as f:
        f.write(json.dumps({"id": "p", "problem": "Print the hidden token.", "task": "code", "tests": tests}) + "\n")
    completion = f"[THINK]Look it up.[/THINK]\n```python\n{look_up([])}```"
    with open(os.path.join(public, "completions.jsonl"), "w") as f:
        f.write(json.dumps({"id": "p", "completion": completion}) + "\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "MAGISTRAL_DATA": os.path.join(public, "problems.jsonl")}
    # `magistral-jax score ...` (its parser and run; without the CLI's start-up imports of JAX)
    cli = "import sys; from magistral_jax.cli import build_parser as b; a = b().parse_args(sys.argv[1:]); a.run(a)"
    command = [sys.executable, "-c", cli, "score", "--data", os.path.join(public, "problems.jsonl")]
    command += ["--completions", "completions.jsonl", "--workers", "1", "--no-language"]
    run = subprocess.run(command, cwd=public, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    (record,) = [json.loads(line) for line in run.stdout.splitlines()]
    assert record["components"]["correct"] == 0.0 and record["components"]["format"] == 0.1
    assert SECRET not in run.stdout and "wrong output" in record["reason"]


def test_attack_reading_the_scorers_environment(monkeypatch, boxes):
    monkeypatch.setenv("MAGISTRAL_TEST_SECRET", SECRET)
    program = textwrap.dedent("""
        import os
        found = [os.environ.get("MAGISTRAL_TEST_SECRET", "")]
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            try:
                found += [w.decode() for w in open(f"/proc/{pid}/environ", "rb").read().split(b"\\0")]
            except OSError:
                pass
        hits = [w.split("=", 1)[-1] for w in found if "MAGISTRAL_TEST_SECRET" in w or w.startswith("secret-")]
        print(hits[0] if hits else "nothing")
    """)
    ok, reason = score(program, [{"input": "\n", "output": SECRET + "\n"}])
    assert not ok and reason.endswith("wrong output")


def test_attack_tracing_or_signalling_the_scorer(boxes):
    # The program solves the task while it attacks: ptrace and SIGKILL its parent, PID 1, every
    # process it may signal (-1) and the scorer's real pid. It must not gain control (ptrace),
    # and the scorer must go on and give its honest answer full marks.
    program = textwrap.dedent(f"""
        import ctypes, os, signal
        libc = ctypes.CDLL(None, use_errno=True)
        for pid in {{os.getppid(), 1, {os.getpid()}}}:
            if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
                raise SystemExit("attached to " + str(pid))
        for pid in (os.getppid(), 1, {os.getpid()}, -1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    """)
    assert score(program + SOLVE, TESTS * 2) == (True, None)


def test_attack_gaining_privileges_through_setuid_programs(boxes):
    # A setuid program could only raise privileges where its mount honours setuid bits and the
    # process may gain privileges; the program prints the answer if any such program exists.
    program = textwrap.dedent("""
        import os, stat
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        can_gain = status["NoNewPrivs"].strip() == "0"
        for top in ("/usr/bin", "/usr/sbin", "/usr/lib", "/bin"):
            for root, dirs, files in os.walk(top):
                for name in files:
                    path = os.path.join(root, name)
                    try:
                        st = os.lstat(path)
                    except OSError:
                        continue
                    if st.st_mode & stat.S_ISUID and not os.statvfs(path).f_flag & os.ST_NOSUID:
                        can_gain = True
                dirs[:] = dirs if top != "/usr/lib" else []
        print(5 if can_gain else 0)
    """)
    ok, reason = score(program, TESTS)
    assert not ok and reason.endswith("wrong output")


LEAKS = textwrap.dedent(f"""
    import ctypes, os, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    for i in range(3):  # 3 x 20 MB of SysV shared memory, touched, detached, never removed
        shm = libc.shmget(0, 20 << 20, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
        address = libc.shmat(shm, None, 0)
        if address not in (None, ctypes.c_void_p(-1).value):
            ctypes.memset(address, 1, 20 << 20)
            libc.shmdt(ctypes.c_void_p(address))
    for path in ("/run/lock/{MARK}", "/dev/shm/sem.{MARK}", "/tmp/{MARK}", "/var/tmp/{MARK}"):
        try:
            open(path, "w").write("left behind")
        except OSError:
            pass
    libc.sem_open.restype = ctypes.c_void_p
    libc.sem_open(b"/{MARK}-named", 0o100, 0o600, 1)  # a POSIX semaphore: /dev/shm/sem.*
    if os.fork() == 0:
        os.setsid()
        time.sleep(60)
""")


def test_leaks_outlive_nothing(boxes):
    assert score(LEAKS + SOLVE, TESTS * 2) == (True, None)
    for path in (f"/run/lock/{MARK}", f"/dev/shm/sem.{MARK}", f"/dev/shm/sem.{MARK}-named", f"/tmp/{MARK}"):
        assert not os.path.exists(path)


def test_nothing_of_a_run_reaches_the_next(boxes):
    # The first run leaves a process, a SysV segment and files in every writable place; the
    # second prints the expected "found" only if any of them is still there.
    program = textwrap.dedent(f"""
        import ctypes, os, sys, time
        libc = ctypes.CDLL(None, use_errno=True)
        places = ["/tmp/{MARK}", "/dev/shm/{MARK}", "/run/lock/{MARK}", os.path.expanduser("~/{MARK}")]
        if input() == "first":
            libc.shmget(0x5EED, 4096, 0o1600)
            for path in places:
                try:
                    open(path, "w").close()
                except OSError:
                    pass
            if os.fork() == 0:
                os.setsid()
                time.sleep(60)
            print("planted")
        else:
            others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid())]
            left = others or libc.shmget(0x5EED, 0, 0) >= 0 or any(os.path.exists(p) for p in places)
            print("found" if left else "clean")
    """)
    tests = [{"input": "first\n", "output": "planted\n"}, {"input": "second\n", "output": "found\n"}]
    ok, reason = score(program, tests)
    assert not ok and reason == "code: test 2/2: wrong output"


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler on this machine")
def test_a_cpp_completion_attacking_the_same_way(host, boxes):
    # Reads the secret, /etc/passwd and the bundled problems, leaves shared memory, files and a
    # detached child; prints the secret if it read it.
    program = textwrap.dedent(f"""
        #include <fstream>
        #include <iostream>
        #include <sstream>
        #include <sys/shm.h>
        #include <unistd.h>
        int main() {{
            shmget(IPC_PRIVATE, 10 << 20, IPC_CREAT | 0600);
            std::ofstream("/tmp/{MARK}") << "left";
            std::ofstream("/dev/shm/sem.{MARK}") << "left";
            if (fork() == 0) {{ setsid(); sleep(60); return 0; }}
            for (const char* path : {{"{host["secret"]}", "/proc/1/root{host["secret"]}", "/etc/passwd",
                                      "{BUNDLED_CODE}"}}) {{
                std::ifstream f(path);
                if (f) {{ std::stringstream s; s << f.rdbuf(); std::cout << s.str(); return 0; }}
            }}
            std::cout << "nothing" << std::endl;
        }}
    """)
    ok, reason = score(program, [{"input": "\n", "output": SECRET + "\n"}], language="cpp")
    assert not ok and reason.endswith("wrong output")
    assert not os.path.exists(f"/tmp/{MARK}") and not os.path.exists(f"/dev/shm/sem.{MARK}")


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_gets_no_reward_and_leaves_nothing(name, boxes):
    program, why = HOSTILE[name]
    with bounded():
        ok, reason = code_correct(python_answer(program + SOLVE), TESTS, seed=0, limits=Limits(timeout=2.0))
    if why is not None:
        assert not ok and any(w in reason for w in ((why,) if isinstance(why, str) else why)), reason
    assert not os.path.exists(f"/tmp/escape-{MARK}") and not os.path.exists(os.path.join(ROOT, f"escape-{MARK}"))


def test_the_output_kept_is_bounded():
    with Sandbox() as box:
        box.write("main.py", "import sys\nwhile True:\n    sys.stdout.write('x' * 2**20)\n")
        result = box.run([box.python, "-I", box.path("main.py")], "", Limits(timeout=2.0, output_bytes=2**20))
        assert not result.ok and "File too large" in result.reason and 0 < len(result.stdout) <= 2**20


def test_the_package_is_masked_where_a_bound_directory_holds_it():
    # A tool installed in the project tree shows that tree (as /usr shows a package installed
    # there); the package inside it, with its bundled problem sets, stays hidden.
    if os.path.realpath(ROOT).startswith("/tmp/"):
        pytest.skip(
            "a checkout under /tmp: its tools are refused (see test_a_tool_installed_under_tmp_is_refused_by_name)"
        )
    package = os.path.dirname(magistral_jax.__file__)
    with Sandbox(tools=[os.path.join(ROOT, "tools", "make_datasets.py")]) as box:
        box.write("main.py", f"import os\nprint('pyproject.toml' in os.listdir({ROOT!r}), os.listdir({package!r}))\n")
        result = box.run([box.python, "-I", box.path("main.py")])
    assert (result.ok, result.stdout) == (True, "True []\n"), result.reason


def test_a_tool_installed_under_tmp_is_refused_by_name(tmp_path):
    # Every run gets a /tmp of its own (the root itself is built over /tmp): a tool installed under
    # /tmp (a project or virtual environment there, as pytest's tmp_path is) could not be shown.
    # Said before anything starts, naming it, rather than a failed mount or a program not found.
    tool = tmp_path / "prefix" / "bin" / "tool"
    tool.parent.mkdir(parents=True)
    tool.write_text("echo tool\n")
    with pytest.raises(SandboxError, match=rf"sandbox: {tmp_path / 'prefix'} is under /tmp"):
        Sandbox(tools=[str(tool)])
    with Sandbox() as box:  # and the sandbox is still available
        box.write("main.py", SOLVE)
        assert box.run([box.python, "-I", box.path("main.py")], "4 5\n").stdout == "9\n"


def test_files_are_written_before_any_program_runs():
    with Sandbox() as box:
        box.write("main.py", SOLVE)
        assert box.run([box.python, "-I", box.path("main.py")], "4 5\n").stdout == "9\n"
        with pytest.raises(ValueError, match="before any program runs"):
            box.write("main.py", "print(1)")
        # the box is read-only once the tests run
        result = box.run([box.python, "-I", "-c", f"open({box.path('main.py')!r}, 'w')"])
        assert not result.ok and "Read-only file system" in result.reason


KILLED_SCORER = textwrap.dedent(f"""
    import sys
    from magistral_jax.rl.magistral_rewards import code_correct
    program = {LEAKS + "import time; time.sleep(60)"!r}
    code_correct("```python\\n" + program + "```", [{{"input": "", "output": ""}}], seed=0)
""")


def test_killing_the_scorer_ends_everything_it_started():
    scorer = subprocess.Popen([sys.executable, "-c", KILLED_SCORER], env={**os.environ, "PYTHONPATH": ROOT})
    try:
        deadline = time.monotonic() + BOUND
        while True:  # until the program and its detached child run, as the sandbox's uid
            started = descendants(scorer.pid)
            table = processes()
            confined = [table[pid][2] for pid, _ in started if pid in table and table[pid][2] != 0]
            if len(confined) >= 2:
                break
            assert time.monotonic() < deadline and scorer.poll() is None, "the sandboxed program never started"
            time.sleep(0.05)
        time.sleep(0.3)  # its leaks are made
        scorer.kill()
        scorer.wait()
        assert wait_until_gone(started) == set()
        uid = confined[0]
        assert uid_processes(uid) == [] and uid_files(uid) == [] and uid_shm(uid) == []
    finally:
        scorer.kill()


def test_a_pool_scoring_hostile_completions_keeps_running():
    # Through the reward pool, as the trainer calls it: the hostile completion gets its reason,
    # the honest one its reward, and the pool goes on scoring.
    completions = [
        f"[THINK]Add.[/THINK]```python\n{HOSTILE['forks repeatedly'][0]}{SOLVE}```",
        f"[THINK]Add.[/THINK]```python\n{SOLVE}```",
    ]
    fields = {"task": ["code"] * 2, "tests": [TESTS] * 2, "test_seed": [0, 0]}
    with RewardPool("magistral", {"language_reward": False}, workers=1) as pool:
        for _ in range(2):
            out = pool(["Add two numbers."] * 2, completions, **fields)
            assert out.components["correct"] == [0.0, 0.9]
            assert out.reasons[0].startswith("code: test 1/1:") and out.reasons[1] is None
    direct = magistral(["Add two numbers."] * 2, completions, **fields, language_reward=False)
    assert direct.rewards == out.rewards


def test_a_completion_past_the_pools_time_limit_gets_zero_and_the_pool_goes_on():
    # Three tests of 1.5 s each: within every per-test limit, beyond the pool's 2 s per completion.
    slow = f"[THINK]Add.[/THINK]```python\nimport time\ntime.sleep(1.5)\n{SOLVE}```"
    honest = f"[THINK]Add.[/THINK]```python\n{SOLVE}```"
    fields = {"task": ["code"] * 2, "tests": [TESTS * 3] * 2, "test_seed": [0, 0]}
    with RewardPool("magistral", {"language_reward": False}, workers=1, timeout=2.0) as pool:
        start = time.monotonic()
        out = pool(["Add."] * 2, [slow, honest], **fields)
        assert time.monotonic() - start < 2.0 + BOUND / 2
        assert out.rewards == [0.0, pytest.approx(1.0)] and out.components["format"] == [0.0, 0.1]
        assert out.reasons[0] == "grader: time limit: scoring took more than 2 s" and out.reasons[1] is None
    # the killed worker's sandbox is gone with it; the pool's live worker ends with the pool
    assert wait_until_gone(descendants(os.getpid())) == set()


def test_threads_sharing_a_pool_get_their_own_rewards_from_at_most_its_workers():
    # Asynchronous GRPO's verifier threads call one pool at once: each must get the rewards of its
    # own completions, and the pool must not start more than `workers` processes in all.
    import threading

    start = threading.Barrier(3)
    failures = []

    def verifier(t: int, pool: RewardPool) -> None:
        ids = [[7] * k + [1] * (t + 1) for k in range(6)]
        start.wait()
        for _ in range(3):
            got = pool(["p"] * 6, ["c"] * 6, completion_ids=ids).rewards
            if got != [k / (k + t + 1) for k in range(6)]:
                failures.append((t, got))

    with RewardPool("token_frequency", {"token": 7}, workers=2) as pool:
        threads = [threading.Thread(target=verifier, args=(t, pool)) for t in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(BOUND)
        assert failures == [] and not any(thread.is_alive() for thread in threads)
        assert len(pool._idle) == 2 and len(descendants(os.getpid())) == 2


POOL_PARENT = textwrap.dedent("""
    import json, os
    from magistral_jax.rl.pool import RewardPool
    pool = RewardPool("magistral", {"language_reward": False}, workers=2)
    def code(program, tests):
        return pool(["Add."] * 2, ["[THINK]Add.[/THINK]```python\\n" + program + "```"] * 2, task=["code"] * 2,
                    tests=[tests] * 2)
    assert code("print(5)", [{"input": "", "output": "5"}]).components["correct"] == [0.9, 0.9]
    pids = [w.proc.pid for w in pool._idle]
    mapped = [p for pid in [os.getpid(), *pids] for p in open(f"/proc/{pid}/maps").read().split() if "/dev/shm/" in p]
    print(json.dumps([pids, mapped]), flush=True)
    code("import time\\ntime.sleep(3)\\nprint(5)", [{"input": "", "output": "5"}] * 10)  # 30 s: killed first
""")


@pytest.mark.parametrize("how", ["process", "process group"])
def test_reward_workers_end_with_a_killed_parent(how):
    # Killed while its workers are busy (each running a sandboxed program): the workers, their
    # sandboxes and the programs end too.
    parent = subprocess.Popen(
        [sys.executable, "-c", POOL_PARENT],
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        with bounded():
            pids, mapped = json.loads(parent.stdout.readline())
            assert len(pids) == 2 and mapped == []  # no semaphore (or other /dev/shm file) in use
            while True:  # until both workers run their sandboxed program
                started = descendants(parent.pid)
                table = processes()
                if sum(1 for pid, _ in started if pid in table and table[pid][2] != 0) >= 2:
                    break
                time.sleep(0.05)
        if how == "process":
            parent.kill()
        else:
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
        assert wait_until_gone(started) == set()
    finally:
        parent.kill()


def test_the_mode_is_chosen_explicitly(monkeypatch):
    assert sandbox_mode() == "root"
    monkeypatch.setenv("MAGISTRAL_SANDBOX", "unconfined")
    assert sandbox_mode() == "unconfined"
    monkeypatch.setenv("MAGISTRAL_SANDBOX", "off")
    with pytest.raises(ValueError, match="MAGISTRAL_SANDBOX='off': expected `unconfined` or unset"):
        sandbox_mode()


NO_USER_NAMESPACES = textwrap.dedent("""
    import ctypes, json, os
    # A user namespace of our own in which no further one may be made, and our uid is not root:
    # a machine where unprivileged user namespaces are off.
    libc = ctypes.CDLL(None, use_errno=True)
    uid = os.getuid()
    assert libc.unshare(0x10000000) == 0
    for path, text in (("setgroups", "deny"), ("uid_map", f"1000 {uid} 1"), ("gid_map", f"1000 {uid} 1")):
        open("/proc/self/" + path, "w").write(text)
    open("/proc/sys/user/max_user_namespaces", "w").write("0")
    from magistral_jax.rl.magistral_rewards import code_correct
    from magistral_jax.rl.sandbox import Sandbox, SandboxUnavailable
    program = "```python\\na, b = map(int, input().split())\\nprint(a + b)\\n```"
    tests = [{"input": "2 3\\n", "output": "5\\n"}]
    try:
        refused = repr(code_correct(program, tests, seed=0))
    except SandboxUnavailable as e:
        refused = str(e)
    os.environ["MAGISTRAL_SANDBOX"] = "unconfined"
    with Sandbox() as box:
        box.write("main.py", "print(1)")
        assert box.run([box.python, "-I", box.path("main.py")]).stdout == "1\\n"
    print(json.dumps([refused, code_correct(program, tests, seed=0), os.path.exists(box.box)]))
""")


def test_a_machine_without_user_namespaces_refuses_unless_unconfined_is_asked_for():
    run = subprocess.run(
        [sys.executable, "-c", NO_USER_NAMESPACES],
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=BOUND,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    refused, unconfined, box_left = json.loads(run.stdout)
    assert refused.startswith("sandbox: cannot confine untrusted code on this machine (user mode: unshare:")
    assert "sysctl user.max_user_namespaces=10000" in refused and "MAGISTRAL_SANDBOX=unconfined" in refused
    assert unconfined == [True, None] and not box_left
    assert "WARNING: MAGISTRAL_SANDBOX=unconfined" in run.stderr


SIGNALS_INIT = textwrap.dedent("""
    import os, signal, threading, time
    def pester():
        while True:
            for sig in (signal.SIGINT, signal.SIGALRM, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
                try:
                    os.kill(1, sig)
                except OSError:
                    pass
    threading.Thread(target=pester, daemon=True).start()
    time.sleep(0.3)
    if os.fork() == 0:  # and keeps pestering after the program's end
        pester()
""")

AS_A_USER = textwrap.dedent("""
    import json, os, sys, time
    from magistral_jax.rl.magistral_rewards import code_correct
    cases = json.load(open(sys.argv[1]))
    out = {}
    for name, (program, tests) in cases.items():
        start = time.monotonic()
        ok, reason = code_correct("```python\\n" + program + "```", tests, seed=0)
        out[name] = [ok, reason, time.monotonic() - start]
    print(json.dumps(out))
""")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to become another user")
def test_attacks_as_an_ordinary_user(public):
    # As `nobody`: the program's uid is the user's own (in a user namespace), so the user's own
    # files, processes and segments are what it must not reach or leave behind.
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip("needs a system Python that `nobody` may run")
    user, home = 65534, public
    secret = os.path.join(home, "secret.txt")
    with open(secret, "w") as f:
        f.write(SECRET + "\n")
    data = os.path.join(home, "problems.jsonl")
    hidden = [{"input": f"token-{MARK}\n", "output": SECRET + "\n"}]
    with open(data, "w") as f:
        f.write(json.dumps({"id": "p", "problem": "Print the token.", "tests": hidden}) + "\n")
    for path in (secret, data, home):
        os.chown(path, user, user)
    os.chmod(secret, 0o600)
    cases = {
        "honest": (SOLVE, TESTS),
        "reads the user's file": (steal([secret]), [{"input": "\n", "output": SECRET + "\n"}]),
        "looks up the data file in the command line": (look_up([]), hidden),
        "symlinks the streams": (f"HOST = {secret!r}\n" + plant("symlink") + SOLVE, TESTS * 2),
        "plants fifos": (f"HOST = {secret!r}\n" + plant("fifo") + SOLVE, TESTS * 2),
        "leaks and kills": (LEAKS + "import os, signal\nos.kill(-1, signal.SIGKILL)\n" + SOLVE, TESTS * 2),
        # its run's init has the program's uid here: any signal it handled would reach it
        "signals its init": (SIGNALS_INIT + SOLVE, TESTS * 2),
    }
    with open(os.path.join(home, "cases.json"), "w") as f:
        json.dump(cases, f)
    before = owned_by(user)
    become = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    run = subprocess.run(
        # the data file's path is in the scorer's command line
        [*become, python, "-c", AS_A_USER, os.path.join(home, "cases.json"), data],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ROOT, "HOME": home},
        cwd=home,
        capture_output=True,
        text=True,
        timeout=4 * BOUND,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout)
    assert SECRET not in run.stdout
    assert {k: v[:2] for k, v in results.items() if k in ("honest", "symlinks the streams", "plants fifos")} == {
        "honest": [True, None],
        "symlinks the streams": [True, None],
        "plants fifos": [True, None],
    }
    assert results["leaks and kills"][:2] == [True, None]  # kill(-1) reached nothing outside
    assert results["signals its init"][:2] == [True, None]
    for name in ("reads the user's file", "looks up the data file in the command line"):
        assert not results[name][0] and results[name][1].endswith("wrong output")
    assert all(v[2] < BOUND for v in results.values())
    with open(secret) as f:
        assert f.read() == SECRET + "\n"
    assert wait_until_gone(owned_by(user) - before) == set()
    assert uid_shm(user) == []
    for path in (f"/run/lock/{MARK}", f"/dev/shm/sem.{MARK}", f"/dev/shm/sem.{MARK}-named", f"/tmp/{MARK}"):
        assert not os.path.exists(path)
