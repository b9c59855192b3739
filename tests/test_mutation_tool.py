"""tools/mutation.py, the mutation tester (TESTING.md): its selections and sessions, without
running a mutant (cosmic-ray's `init` only)."""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("mutation_tool", os.path.join(ROOT, "tools", "mutation.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_equivalent_mutant_names_a_line_its_module_still_has(tool):
    # A key whose line has changed matches nothing: its mutant would count as a survivor again.
    for module, line, operator, *_ in tool.EQUIVALENT:
        source = Path(ROOT, "magistral_jax", module).read_text()
        assert line in {s.strip() for s in source.splitlines()}, (module, line)
        assert operator in tool.OPERATORS, operator


def test_every_selected_test_exists(tool):
    for module, tests in tool.MODULES.items():
        assert Path(ROOT, "magistral_jax", module).is_file(), module
        for test in tests:
            path, _, name = test.partition("::")
            tree = ast.parse(Path(ROOT, path).read_text())
            defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert not name or name in defined, test


@pytest.mark.parametrize(("n", "small", "large"), [(263, 10, 90), (263, 90, 140), (40, 5, 39), (7, 3, 100)])
def test_a_larger_sample_holds_every_mutant_of_a_smaller_one(tool, n, small, large):
    order = list(range(n))
    a, b = tool._sampled(order, small), tool._sampled(order, large)
    assert len(a) == min(small, n) and len(b) == min(large, n) and set(a) <= set(b)
    assert a == sorted(a) and tool._sampled(order, 0) == order  # the order kept; 0: every mutant
    assert tool._sampled(order, small) == a  # seeded


def test_a_session_grows_to_a_larger_sample_keeping_what_ran(tool, tmp_path):
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    target = Path(ROOT, "magistral_jax", "model", "layers.py")
    config = tmp_path / "cr.toml"
    config.write_text(
        f'[cosmic-ray]\nmodule-path = "{target}"\ntimeout = 10\nexcluded-modules = []\ntest-command = "true"\n'
        '[cosmic-ray.distributor]\nname = "local"\n'
    )
    db_path = tmp_path / "session.sqlite"
    subprocess.run([sys.executable, "-m", "cosmic_ray.cli", "init", str(config), str(db_path)], check=True)
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        every = len(tool._candidates(db.work_items, target))
        assert tool._skip(db, target, 5) == 5
        first = [item.job_id for item in db.pending_work_items]
        for job in first[:3]:  # three ran
            db.set_result(job, WorkResult(worker_outcome=WorkerOutcome.NORMAL, test_outcome=TestOutcome.KILLED))

    def state():
        with use_db(str(db_path), WorkDB.Mode.open) as db:
            ran = {i.job_id for i, r in db.completed_work_items if r.worker_outcome == WorkerOutcome.NORMAL}
            return ran, {i.job_id for i in db.pending_work_items}

    assert tool._grow(db_path, target, 12) == 7
    ran, pending = state()
    assert ran == set(first[:3]) and set(first[3:]) <= pending and len(pending) == 9
    assert tool._grow(db_path, target, 0) == every - 12
    ran, pending = state()
    assert ran == set(first[:3]) and len(pending) == every - 3
