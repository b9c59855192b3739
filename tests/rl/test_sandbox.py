"""Hostile code completions: no reward, a reason, and nothing left behind.

Each program prints the right answer if it ever gets that far, so only the sandbox stands between
it and the reward. The isolation (network namespace, a private uid, the process limit, clean-up
by uid) needs root; without it these tests are skipped.
"""

import os
import stat
import uuid

import pytest

from magistral_jax.rl import magistral_rewards
from magistral_jax.rl.magistral_rewards import code_correct, magistral
from magistral_jax.rl.rewards import RewardPool
from magistral_jax.rl.sandbox import SHARED_TMP, Limits, Sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandbox isolation needs root")

TESTS = [{"input": "2 3\n", "output": "5\n"}]
SOLVE = "a, b = map(int, input().split())\nprint(a + b)\n"
MARK = uuid.uuid4().hex

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
    "writes outside its directory": (f"open({os.getcwd()!r} + '/escape-{MARK}', 'w').write('x')\n", "PermissionError"),
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


@pytest.fixture
def boxes(monkeypatch):
    made = []

    class Recorded(Sandbox):
        def __init__(self):
            super().__init__()
            made.append(self)

    monkeypatch.setattr(magistral_rewards, "Sandbox", Recorded)
    return made


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_gets_no_reward_and_leaves_nothing(name, boxes):
    program, why = HOSTILE[name]
    answer = f"Solution:\n```python\n{program}{SOLVE}```"
    ok, reason = code_correct(answer, TESTS, seed=0, limits=Limits(timeout=2.0))
    (box,) = boxes
    if why is not None:
        assert not ok and any(w in reason for w in ((why,) if isinstance(why, str) else why)), reason
    # nothing left: no process of the sandbox uid, no file it made, no private directory
    assert uid_processes(box.uid) == []
    assert uid_files(box.uid) == []
    assert not os.path.exists(box.dir)
    assert not os.path.exists(f"/tmp/escape-{MARK}") and not os.path.exists(f"escape-{MARK}")


def test_the_output_kept_is_bounded():
    with Sandbox() as box:
        box.write("main.py", "import sys\nwhile True:\n    sys.stdout.write('x' * 2**20)\n")
        result = box.run([box.python, "-I", "main.py"], "", Limits(timeout=2.0, output_bytes=2**20))
        assert not result.ok and len(result.stdout) <= 2**20
        assert os.path.getsize(box.path(".stdout")) <= 2**20


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
