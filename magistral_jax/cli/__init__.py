"""The `magistral-jax` command line: one entry point, a subcommand per capability.

Before a command runs (and before JAX starts its backends), the entry point
- chooses the platforms: with libtpu installed (the `tpu` extra) but no TPU attached, JAX would
  start libtpu and print its start-up errors; every command but `plan` (which compiles for TPU
  topologies itself) then runs on the GPU or the CPU. A `JAX_PLATFORMS` the user set is kept.
- turns on JAX's persistent compilation cache (see `compilation_cache_dir`), so that a command
  run again with the same shapes loads its programs instead of compiling them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings

from magistral_jax.cli import bench, convert, demo, evaluate, export, generate, plan, score, train

_COMMANDS = (demo, convert, generate, train, export, score, evaluate, bench, plan)
CACHE_ENV = "MAGISTRAL_COMPILATION_CACHE"
# Programs that compile faster than this are not worth a cache entry (JAX's default is 1 s, which
# would leave out every program of a small model).
CACHE_MIN_COMPILE_SECONDS = 0.2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magistral-jax",
        description="Magistral / Mistral Small 24B in pure JAX. Run a subcommand with --help for its options.",
        epilog=(
            f"Compiled programs are cached in $XDG_CACHE_HOME/magistral-jax/jax (~/.cache/magistral-jax/jax), "
            f"so a command run again with the same shapes starts faster; {CACHE_ENV}=DIR moves the cache, "
            f"{CACHE_ENV}=off turns it off."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    return parser


def compilation_cache_dir(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """Where compiled programs are cached: `$MAGISTRAL_COMPILATION_CACHE` (`off`, `0` or `none`:
    nowhere), else JAX's own `$JAX_COMPILATION_CACHE_DIR`, else `magistral-jax/jax` under
    `$XDG_CACHE_HOME` (default `~/.cache`)."""
    value = environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none", "false") else os.path.expanduser(value)
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "magistral-jax", "jax")


def _set_up_compilation_cache(command: str) -> None:
    if command == "plan":
        return  # its TPU executables are large and compiled once per question
    path = compilation_cache_dir()
    # JAX reads these variables when it is imported (not yet, here); its child processes too.
    if path is None:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(CACHE_MIN_COMPILE_SECONDS))
    if "jax" in sys.modules:  # imported already (`main` called from Python)
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        if path is not None:
            min_seconds = float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
            jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)


def _platforms_without_tpu() -> str | None:
    """The platforms to run on when libtpu is installed but no TPU is attached (GPUs whose JAX
    plugin is installed, then the CPU); None when there is a TPU or libtpu is absent."""
    if importlib.util.find_spec("libtpu") is None:
        return None
    try:
        # JAX's own check (PCI vendor and device ids), which knows each new TPU generation.
        from jax._src import hardware_utils
    except ImportError:
        return None
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        return None
    from importlib.metadata import entry_points

    plugins = {e.value for e in entry_points(group="jax_plugins")}
    if importlib.util.find_spec("jax_plugins") is not None:
        import pkgutil

        import jax_plugins

        plugins |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
    platforms = []
    if any("cuda" in p for p in plugins) and hardware_utils.has_visible_nvidia_gpu():
        platforms.append("cuda")
    if any("rocm" in p for p in plugins) and os.path.exists("/dev/kfd"):
        platforms.append("rocm")
    return ",".join([*platforms, "cpu"])


def _choose_platforms(command: str) -> None:
    if command == "plan" or "JAX_PLATFORMS" in os.environ:
        return
    platforms = _platforms_without_tpu()
    if platforms is None:
        return
    os.environ["JAX_PLATFORMS"] = platforms  # for this process's JAX and any child process
    import jax

    jax.config.update("jax_platforms", platforms)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # The checkpoint warnings name their tensors and files already: one line, no source location.
    from magistral_jax.checkpoint import NonFiniteWarning

    if issubclass(category, NonFiniteWarning):
        print(f"magistral-jax: warning: {message}", file=file or sys.stderr)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # KEY=VALUE overrides may follow options (`train grpo --config f.yaml steps=10`).
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    _set_up_compilation_cache(args.command)
    _choose_platforms(args.command)
    warnings.showwarning = _show_warning
    from magistral_jax.checkpoint import CheckpointError
    from magistral_jax.config import ConfigError
    from magistral_jax.train.step import TrainingError

    try:
        return int(args.run(args) or 0)
    except (CheckpointError, ConfigError, TrainingError, ValueError, OSError) as e:
        print(f"magistral-jax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
