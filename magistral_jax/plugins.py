"""User code named by import path (`package.module:function`), as configs name rewards and data sources.

`reward.name=my_pkg.rewards:my_reward` or `data.name=my_pkg.data:my_source` imports the module
where the name is resolved: the trainer's process for data sources, and every reward worker process
(spawned, so it imports the module itself) for rewards. The module must be importable there: on
`sys.path`, e.g. installed or through `PYTHONPATH`.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_path(name: Any) -> bool:
    """Whether `name` has the `module:attribute` form."""
    return isinstance(name, str) and ":" in name


def load_object(path: str, what: str) -> Any:
    """The callable `attribute` of `module` for `path` = `module:attribute` (dots in the attribute
    reach nested objects); errors name `what` (the config key) and the part that failed."""
    if not _PATH.match(path):
        raise ValueError(f"{what}: {path!r} is not an import path; expected package.module:function")
    module_name, _, attribute = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"{what}: cannot import {module_name!r} ({e}); is it on PYTHONPATH?") from None
    except Exception as e:  # the module's own code failed: say so in one line
        raise ValueError(f"{what}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what}: {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what}: {path!r} is a {type(obj).__name__}, not a function or class")
    return obj
