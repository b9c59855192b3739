"""Sandbox launcher: isolate, limit, then exec the program (see sandbox.py).

Usage: python -I -S sandbox_launch.py UID DIR MEMORY CPU FSIZE NPROC NOFILE STDIN STDOUT STDERR -- ARGV...
UID -1 means: stay the current user (no namespace, no privilege drop). Standalone on purpose: it
runs under whatever Python the sandbox user may execute, importing nothing from the project.
"""

import ctypes
import os
import resource
import sys

CLONE_NEWNET = 0x40000000


def main() -> None:
    sep = sys.argv.index("--")
    uid, workdir, memory, cpu, fsize, nproc, nofile, stdin, stdout, stderr = sys.argv[1:sep]
    argv = sys.argv[sep + 1 :]
    uid = int(uid)
    if uid >= 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            sys.stderr.write(f"cannot isolate the network (errno {ctypes.get_errno()})\n")
            sys.exit(70)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    os.chdir(workdir)
    limits = (
        (resource.RLIMIT_AS, int(memory)),
        (resource.RLIMIT_CPU, int(cpu)),
        (resource.RLIMIT_FSIZE, int(fsize)),
        (resource.RLIMIT_NOFILE, int(nofile)),
        (resource.RLIMIT_CORE, 0),
    )
    if uid >= 0:
        limits += ((resource.RLIMIT_NPROC, int(nproc)),)
    for kind, value in limits:
        resource.setrlimit(kind, (value, value))
    fds = (
        os.open(stdin, os.O_RDONLY),
        os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
        os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
    )
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.execvp(argv[0], argv)


main()
