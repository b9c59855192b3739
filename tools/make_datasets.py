"""Writes the bundled data sets (magistral_jax/data/bundled/) from the templates in
magistral_jax/data/generated.py. Deterministic: running it again reproduces the files byte for byte.

    python tools/make_datasets.py [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from magistral_jax.data.generated import code_set, math_set

OUT = os.path.join(os.path.dirname(__file__), os.pardir, "magistral_jax", "data", "bundled")
FILES = {
    "math_multilingual.jsonl": lambda: math_set(n_per_cell=40, seed=2506),
    "python_tasks.jsonl": lambda: code_set(n_tests=12, seed=2507),
}


def render(rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the files on disk differ")
    args = parser.parse_args()
    stale = []
    for name, make in FILES.items():
        path = os.path.join(OUT, name)
        text = render(make())
        if args.check:
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    stale.append(name)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run tools/make_datasets.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
