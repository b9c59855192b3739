"""Mutation testing of the modules where a silent bug costs a training run (not part of CI: hours).

    python tools/mutation.py                       # every module in MODULES, one after the other
    python tools/mutation.py rl/losses.py          # one module (resumes its session if it was cut)
    python tools/mutation.py --sample 90 MODULE    # a seeded random 90 of its mutants; a larger
                                                   # --sample (0: all) later adds to them
    python tools/mutation.py --survivors MODULE    # after adding tests: only the survivors again
    python tools/mutation.py --list                # the modules, their tests and mutant counts

Cosmic Ray (the `test` extra) makes each mutant: one small change to one module (an operator, a
comparison, a constant, a condition, ...), then runs the fast tests that cover that module
(`MODULES`) in a fresh process; the mutant is killed when a test fails. Each module works in its
own copy of the repository (the tracked files, under `--work-dir`), so the checkout is never
modified and an interrupted run resumes where it stopped (`--fresh` starts over). Cosmic Ray
numbers a module's mutants by occurrence, so a session lasts while its module is unchanged:
`--survivors` and a larger `--sample` keep what ran, against the tests and the rest of the package
as they are then; a changed module starts over.

The operators are one natural replacement per Python operator (`+` -> `-`, `*` -> `/`, `<` -> `<=`
and `>=`, `and` -> `or`, ...), constants + 1, `not` added and removed, True/False swapped, loops
run zero times, decorators removed, exception handlers that catch nothing. Mutants inside type
annotations are left out (the modules use `from __future__ import annotations`: annotations are
never evaluated). Mutants in `EQUIVALENT` (no test can tell them from the original; each with its
reason) are counted apart and left out of the score.

Output: each surviving mutant as a diff, a line per module, and last
`mutation score: K/N killed (P %)` over the modules run (N: mutants run less the equivalent ones).
TESTING.md holds the last full run.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module (under magistral_jax/) -> the fast tests that cover it (pytest node ids or files)
MODULES: dict[str, list[str]] = {
    "rl/losses.py": [
        "tests/rl/test_losses.py",
        "tests/train/test_objective.py::test_trainer_loss_gradient_and_clip_metrics_off_policy_match_the_formula",
    ],
    "train/step.py": [
        "tests/train/test_objective.py::test_trainer_loss_gradient_and_clip_metrics_off_policy_match_the_formula",
        "tests/train/test_step.py::test_minibatch_gradient_does_not_depend_on_the_microbatch_split",
        "tests/train/test_step.py::test_sft_loss_is_the_mean_cross_entropy_of_the_answer_tokens",
        "tests/train/test_step.py::test_non_finite_updates_are_skipped_and_counted",
        "tests/train/test_step.py::test_optimizer_settings_must_be_positive",
        "tests/train/test_step.py::test_schedule_warmup_and_cosine",
        "tests/train/test_step.py::test_each_finite_update_advances_the_schedule_by_one_step",
        "tests/train/test_step.py::test_an_update_with_a_finite_loss_but_a_non_finite_gradient_is_skipped",
        "tests/train/test_step.py::test_default_optimizer_is_adamw_with_dapos_clipping_and_no_warmup",
        "tests/train/test_step.py::test_the_default_objective_clips_at_dapos_bounds",
        "tests/train/test_step.py::test_a_trainer_stops_at_the_run_configs_default_of_non_finite_updates_in_a_row",
        "tests/train/test_step.py::test_the_objective_of_a_run_samples_and_trains_at_its_temperature",
        "tests/train/test_step.py::test_the_entropy_metric_is_the_mean_over_the_trained_tokens",
        "tests/train/test_step.py::test_a_steps_compile_time_is_what_the_compile_clock_advanced_during_it",
        "tests/train/test_step.py::test_a_multi_process_trainer_places_rows_on_its_models_mesh",
    ],
    "sampling/strategies.py": ["tests/sampling/test_strategies.py"],
    "model/layers.py": [
        "tests/model/test_layers.py",
        "tests/model/test_vision.py::test_two_images_of_different_sizes_in_one_sequence",  # Pixtral's 2D RoPE
    ],
    "model/attention.py": [
        "tests/model/test_attention.py",
        "tests/sampling/test_paged.py::test_paged_attention_reads_each_rows_pages_through_its_table",
        "tests/sampling/test_paged.py::test_paged_attention_reads_the_blocks_its_longest_row_fills_and_no_more",
        "tests/sampling/test_paged.py::test_the_pallas_kernel_serves_a_decode_step_like_the_portable_path",
    ],
    "rl/magistral_rewards.py": ["tests/rl/test_magistral_rewards.py"],
}

# One replacement per operator (cosmic-ray's own set replaces each operator by every other one).
OPERATORS = [
    *(
        f"core/ReplaceBinaryOperator_{a}_{b}"
        for a, b in (
            ("Add", "Sub"),
            ("Sub", "Add"),
            ("Mul", "Div"),
            ("Div", "Mul"),
            ("FloorDiv", "Div"),
            ("Mod", "FloorDiv"),
            ("Pow", "Mul"),
            ("BitAnd", "BitOr"),
            ("BitOr", "BitAnd"),
            ("BitXor", "BitOr"),
            ("LShift", "RShift"),
            ("RShift", "LShift"),
        )
    ),
    *(
        f"core/ReplaceComparisonOperator_{a}_{b}"
        for a, b in (
            ("Lt", "LtE"),
            ("Lt", "GtE"),
            ("LtE", "Lt"),
            ("LtE", "Gt"),
            ("Gt", "GtE"),
            ("Gt", "LtE"),
            ("GtE", "Gt"),
            ("GtE", "Lt"),
            ("Eq", "NotEq"),
            ("NotEq", "Eq"),
            ("Is", "IsNot"),
            ("IsNot", "Is"),
        )
    ),
    "core/ReplaceUnaryOperator_USub_UAdd",
    "core/ReplaceUnaryOperator_Delete_Not",
    "core/ReplaceUnaryOperator_Delete_Invert",
    "core/AddNot",
    "core/ReplaceTrueWithFalse",
    "core/ReplaceFalseWithTrue",
    "core/ReplaceAndWithOr",
    "core/ReplaceOrWithAnd",
    "core/ReplaceBreakWithContinue",
    "core/ReplaceContinueWithBreak",
    "core/ExceptionReplacer",
    "core/NumberReplacer",  # only its + 1 offset (even occurrences), see `_skip`
    "core/RemoveDecorator",
    "core/ZeroIterationForLoop",
]

# (module, the original line stripped, operator[, a piece of the mutated line]) -> why no test can
# tell the mutant from the original.
REWARDS = "rl/magistral_rewards.py"
EQUIVALENT: dict[tuple[str, ...], str] = {
    (
        REWARDS,
        "timeout = 5 if threading.current_thread() is threading.main_thread() else None",
        "core/NumberReplacer",
    ): "math-verify's time limit, 5 or 6 s: the same verdict on every input that finishes",
    (
        REWARDS,
        "Limits(timeout=10.0, memory_mb=2048, processes=64, open_files=256),",
        "core/NumberReplacer",
    ): "the C++ compiler's limits, + 1: no compilation comes near them",
    (
        REWARDS,
        "if n_tokens <= l_max - l_cache:",
        "core/ReplaceComparisonOperator_LtE_Lt",
    ): "at n = l_max - l_cache the linear part of the penalty is 0 as well",
    (
        REWARDS,
        "if n_tokens > l_max:",
        "core/ReplaceComparisonOperator_Gt_GtE",
    ): "at n = l_max the linear part of the penalty is -0.1 as well",
    (
        REWARDS,
        "seed = test_seed[i] if test_seed is not None else 0",
        "core/NumberReplacer",
    ): "without `test_seed` any constant draws the same subset for every completion, the property promised",
    (
        "rl/losses.py",
        "return (adv - adv.mean()) / (adv.std() + EPS)",
        "core/ReplaceBinaryOperator_Add_Sub",
    ): "std +- 1e-8: equal unless the std is 0, when every advantage is 0 either way",
    (
        "rl/losses.py",
        "return (adv - adv.mean()) / (adv.std() + EPS)",
        "core/ReplaceBinaryOperator_Sub_Add",
    ): "group-centred advantages sum to 0 in every group: their minibatch mean is 0, added or subtracted",
    (
        "rl/losses.py",
        "var = np.where(constant, 0.0, np.bincount(inverse, (rewards - means[inverse]) ** 2) / counts)",
        "core/NumberReplacer",
        "constant, 1.0,",
    ): "a constant group's mean is its reward exactly, so r - mean is 0 whatever std divides it",
    (
        "rl/losses.py",
        "return (rewards - mean) / (std + EPS)",
        "core/ReplaceBinaryOperator_Add_Sub",
    ): "std +- 1e-8: equal unless the std is 0, when r - mean is 0 either way",
    (
        "rl/losses.py",
        "return loss, (ratio < 1.0 - eps_low) & (advantages < 0), (ratio > 1.0 + eps_high) & (advantages > 0)",
        "core/ReplaceComparisonOperator_Gt_GtE",
        "ratio >= 1.0 + eps_high",
    ): "a ratio exactly at 1 + eps_high (the clipped and unclipped terms agree there) counted as clipped or not",
    (
        "rl/losses.py",
        "return loss, (ratio < 1.0 - eps_low) & (advantages < 0), (ratio > 1.0 + eps_high) & (advantages > 0)",
        "core/ReplaceComparisonOperator_Lt_LtE",
        "ratio <= 1.0 - eps_low",
    ): "a ratio exactly at 1 - eps_low (the clipped and unclipped terms agree there) counted as clipped or not",
    (
        "train/step.py",
        "_UPDATES_KEPT = 16",
        "core/NumberReplacer",
    ): "how many update programs the cache keeps: a speed, not a result",
    (
        "train/step.py",
        "update, donate_argnums=(0, 1), out_shardings=(param_shardings, state_shardings, None, None)",
        "core/NumberReplacer",
    ): "which input buffers the update may reuse (the optimizer state or the gradients): memory, not a result",
    (
        "train/step.py",
        "return jax.tree.map(lambda x: x if x.committed else jax.device_put(x, x.sharding), tree)",
        "core/AddNot",
    ): "uncommitted arrays make the second step compile its programs again: a speed, not a result (tests/train/"
    "test_step.py::test_the_second_step_compiles_nothing catches it, outside this selection: the mutation runs "
    "share a compilation cache)",
    (
        "train/step.py",
        "@functools.partial(jax.jit, donate_argnums=0)",
        "core/NumberReplacer",
    ): "which buffer the gradient accumulation writes into (the running sum or the microbatch's): memory, not a result",
    (
        "train/step.py",
        "@functools.partial(jax.jit, donate_argnums=0)",
        "core/RemoveDecorator",
    ): "the accumulation run eagerly instead of as one program writing in place: the same sums, more memory",
    (
        "train/step.py",
        "chunk: int = 256,",
        "core/NumberReplacer",
    ): "tokens per log-probability chunk: memory, not a result (each token's log-softmax is whole in one chunk)",
    (
        "train/step.py",
        "if len(_UPDATES) >= _UPDATES_KEPT:",
        "core/ReplaceComparisonOperator_GtE_Gt",
    ): "whether the update cache keeps 16 or 17 programs: a speed, not a result",
    (
        "train/step.py",
        "shared_optimizer = functools.lru_cache(maxsize=16)(make_optimizer)",
        "core/NumberReplacer",
    ): "how many optimizers the cache keeps: a speed, not a result",
    (
        "train/step.py",
        "first = jax.tree.leaves(shardings)[0]",
        "core/NumberReplacer",
    ): "which parameter's sharding names the mesh: every parameter is on the same mesh (or the same device)",
    **{
        ("sampling/strategies.py", line, "core/ReplaceUnaryOperator_USub_UAdd", piece): (
            "the scores are [rows, vocabulary] (`choose` takes 2-D logits): axis 1 is axis -1"
        )
        for piece in ("axis=+1", "shape[+1]")
        for line in (
            "order = jnp.sort(scores, axis=-1)[..., ::-1]",
            "probs = jax.nn.softmax(order, axis=-1)",
            "before = jnp.cumsum(probs, axis=-1) - probs",
            "n_keep = jnp.maximum(jnp.sum(before < p, axis=-1, keepdims=True), 1)",
            "threshold = jnp.take_along_axis(order, n_keep - 1, axis=-1)",
            "logp = jax.nn.log_softmax(scores, axis=-1)",
            "floor = jnp.max(logp, axis=-1, keepdims=True) + jnp.log(min_p)",
            "raw = jax.nn.log_softmax(logits, axis=-1)",
            "tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)",
            "picked = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]",
            "tempered = jax.nn.log_softmax(scores, axis=-1)",
            "scores = _keep_top_k(scores, min(params.top_k, scores.shape[-1]))",
            "take = lambda x: jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0]  # noqa: E731",
        )
    },
    **{
        ("sampling/strategies.py", "if params.top_p < 1:", op): (
            "top-p at p = 1 keeps every token whose preceding mass is below 1 in float32: all but a tail below rounding"
        )
        for op in ("core/NumberReplacer", "core/ReplaceComparisonOperator_Lt_LtE")
    },
    (
        "sampling/strategies.py",
        "if params.min_p > 0:",
        "core/ReplaceComparisonOperator_Gt_GtE",
    ): "min-p 0 keeps every token: its floor is log 0 = -inf",
    (
        "sampling/strategies.py",
        "take = lambda x: jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0]  # noqa: E731",
        "core/NumberReplacer",
        ")[:, 1]",
    ): "column 1 of a [rows, 1] array: JAX clamps the index to 0",
    **{
        (
            "model/attention.py",
            "k_j, v_j = (jax.lax.dynamic_slice(x, (0, layer, 0, start, 0), (b, 1, g, bk, d))[:, 0] for x in (k, v))",
            "core/NumberReplacer",
            starts,
        ): "the slice spans the whole batch, kv-head and head-dim axes: JAX clamps any start on them to 0"
        for starts in ("(1, layer, 0, start, 0)", "(0, layer, 1, start, 0)", "(0, layer, 0, start, 1)")
    },
    (
        "model/attention.py",
        "probs = jax.nn.softmax(jnp.where(seen, logits, 0.0), axis=-1)",
        "core/NumberReplacer",
        "logits, 1.0)",
    ): "rows that see no key get any constant here; their probabilities are zeroed on the next line",
    (
        "model/attention.py",
        "lse = jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf)",
        "core/ReplaceComparisonOperator_Gt_GtE",
    ): "a row that saw no key has a running max of -inf: its log-sum-exp is -inf either way",
    **{
        ("model/attention.py", "safe = jnp.where(denom > 0, denom, 1.0)", "core/NumberReplacer", piece): (
            "a row that saw a key has a denominator of at least 1 (its largest term is exp(0)); one that saw "
            "none has a zero accumulator and a -inf log-sum-exp whatever divides it"
        )
        for piece in ("denom > 1,", "denom, 2.0)")
    },
    (
        "model/attention.py",
        "s, g = k.shape[1], k.shape[2]",
        "core/NumberReplacer",
        "s, g = k.shape[2], k.shape[2]",
    ): "s only sizes the key blocks (min(block, s)), which tile the loop: any size gives the same values",
    (
        "model/attention.py",
        "k_j, v_j = (jax.lax.dynamic_slice(x, (0, layer, 0, start, 0), (b, 1, g, bk, d))[:, 0] for x in (k, v))",
        "core/NumberReplacer",
        ")[:, 1] for x",
    ): "index 1 of the slice's one-layer axis: JAX clamps it to 0",
    (
        "model/attention.py",
        'q[:, 0], k_pages, v_pages, layer, page_table, lengths, scale=scale, interpret=_platform() != "tpu"',
        "core/NumberReplacer",
    ): "the kernel serves one new token per row (T = 1): JAX clamps index 1 to 0",
    (
        "model/attention.py",
        "blk = min(round_up(block, 128), round_up(t, 128))",
        "core/NumberReplacer",
        "round_up(block, 129)",
    ): (
        "splash's tile: the same values for any tile the interpreter accepts; on a TPU a tile that is not a "
        "multiple of 128 would fail to compile, which only a TPU run shows"
    ),
    (
        "model/attention.py",
        "lse = jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf)",
        "core/ReplaceUnaryOperator_USub_UAdd",
    ): "a row that saw no key: the backward reads a non-finite log-sum-exp as 0, -inf and +inf alike",
    (
        "sampling/strategies.py",
        "picked = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]",
        "core/NumberReplacer",
        ")[:, 1]",
    ): "column 1 of a [rows, 1] array: JAX clamps the index to 0",
    **{
        (REWARDS, "out.reasons.append(reason if total == 0 or reason else None)", op): (
            "`reason` is None or a non-empty string, so the expression is `reason` whatever the condition"
        )
        for op in ("core/AddNot", "core/NumberReplacer", "core/ReplaceComparisonOperator_Eq_NotEq")
    },
}


@dataclass
class Result:
    module: str
    killed: int
    survived: list[tuple[str, str, str]]  # (operator, original line, diff) of each survivor
    equivalent: int
    timeouts: int
    incompetent: int
    pending: int  # not run yet (a cut run)
    seconds: float


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the sources and tests
        return [str(p.relative_to(ROOT)) for d in ("magistral_jax", "tests", "configs") for p in (ROOT / d).rglob("*")]


def _fingerprint(files: list[str], module: str) -> str:
    """What a session's results depend on: the module (its mutants are numbered by occurrence in
    it), the rest of the package, then the module's tests."""
    tests = {t.split("::")[0] for t in MODULES[module]} | {"tests/conftest.py"}
    own, package, suite = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for f in sorted(files):
        path = ROOT / f
        if not path.is_file():
            continue
        if f == f"magistral_jax/{module}":
            own.update(path.read_bytes())
        elif f.startswith("magistral_jax/") or f in tests:
            (package if f.startswith("magistral_jax/") else suite).update(f.encode() + b"\0" + path.read_bytes())
    return f"{own.hexdigest()} {package.hexdigest()} {suite.hexdigest()}"


def _copy_repository(dest: Path, files: list[str]) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def _annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    spans = []
    for node in ast.walk(ast.parse(source)):
        annotations = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            annotations += [a.annotation for a in every if a is not None and a.annotation is not None]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for a in annotations:
            if a is not None:
                spans.append(((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)))
    return spans


def _test_command(tests: list[str]) -> str:
    # -x: the first failure kills the mutant; no plugins that write into the copy.
    return f"{sys.executable} -m pytest -x -q -p no:cacheprovider -p no:randomly -o addopts= " + " ".join(tests)


def _environment(copy: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy)  # the copy's magistral_jax, mutated, before any installed one
    # Compiled programs of the code a mutant leaves alone are reused from one test run to the next.
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


def _excluded(mutation, lines: list[str], spans) -> bool:
    """Mutants not run: other operators, constants - 1 (NumberReplacer's odd occurrences), those
    inside annotations, and `*` / `/` alone in a parameter list (keyword-only and positional-only
    markers, which cosmic-ray takes for operators)."""
    line, col = lines[mutation.start_pos[0] - 1], mutation.start_pos[1]
    marker = line[col : col + 1] in "*/" and line[col + 1 :].lstrip().startswith((",", ")"))
    return (
        mutation.operator_name not in OPERATORS
        or (mutation.operator_name == "core/NumberReplacer" and mutation.occurrence % 2 == 1)
        or any(a <= tuple(mutation.start_pos) < b for a, b in spans)
        or marker
    )


def _candidates(items, module_file: Path) -> list:
    """The work items that may run (not `_excluded`), in a fixed order."""
    source = module_file.read_text()
    lines, spans = source.splitlines(), _annotation_spans(source)
    chosen = [item for item in items if not _excluded(item.mutations[0], lines, spans)]
    return sorted(chosen, key=lambda i: (str(i.mutations[0].start_pos), i.mutations[0].operator_name))


def _sampled(order: list, sample: int) -> list:
    """A seeded random `sample` of `order` (0: all of it): the first `sample` of one fixed
    permutation, so that a larger sample holds every mutant of a smaller one."""
    if not sample or sample >= len(order):
        return order
    picks = random.Random(0).sample(range(len(order)), len(order))[:sample]
    return [order[k] for k in sorted(picks)]


def _skip(work_db, module_file: Path, sample: int) -> int:
    """Marks as skipped the mutants not run (`_excluded`) and all but a seeded random `sample` of
    the rest (0: keep all). Returns how many are left."""
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    items = list(work_db.pending_work_items)
    kept = {item.job_id for item in _sampled(_candidates(items, module_file), sample)}
    for item in items:
        if item.job_id not in kept:
            work_db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="not run"))
    return len(kept)


def _grow(db_path: Path, module_file: Path, sample: int) -> int:
    """Makes pending again the mutants a larger `sample` (0: all) adds to a session's smaller one;
    what already ran keeps its result. Returns how many were added."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome

    with use_db(str(db_path), WorkDB.Mode.open) as db:
        skipped = {i.job_id for i, r in db.completed_work_items if r.worker_outcome == WorkerOutcome.SKIPPED}
        added = [i.job_id for i in _sampled(_candidates(db.work_items, module_file), sample) if i.job_id in skipped]
    with sqlite3.connect(db_path) as db:
        db.executemany("DELETE FROM work_results WHERE job_id = ?", [(j,) for j in added])
    return len(added)


def _bare(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _equivalent(module: str, line: str, mutation, diff: str) -> bool:
    mutated = "".join(d[1:] for d in diff.splitlines() if d.startswith("+") and not d.startswith("+++"))
    return any(
        key[:3] == (module, line, mutation.operator_name) and (len(key) < 4 or _bare(key[3]) in _bare(mutated))
        for key in EQUIVALENT
    )


def _line(source_lines: list[str], mutation) -> str:
    return source_lines[mutation.start_pos[0] - 1].strip()


def _baseline(command: str, env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command.split(), cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: the tests fail on the unmutated code:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def run_module(
    module: str,
    work_dir: Path,
    fresh: bool,
    timeout_factor: float,
    sample: int | None = None,
    report_only: bool = False,
    survivors: bool = False,
) -> Result | None:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    files = _tracked_files()
    tests = MODULES[module]
    home = work_dir / module.replace("/", "_").removesuffix(".py")
    copy, db_path, stamp = home / "repo", home / "session.sqlite", home / "fingerprint"
    fingerprint = _fingerprint(files, module)
    stamped = stamp.read_text().split() if stamp.exists() and db_path.exists() else []
    before = int(stamped[-1]) if stamped else None
    if sample is None:  # the session's own sample while the module is unchanged, else all
        sample = before if before is not None and stamped[:1] == fingerprint.split()[:1] else 0
    new = fresh or stamped != [*fingerprint.split(), str(sample)]
    env = _environment(copy, work_dir / "jax-cache")
    command = _test_command(tests)
    target = copy / "magistral_jax" / module
    grow = before not in (None, sample) and before != 0 and (sample == 0 or sample > before)
    if new and (survivors or grow) and stamped[:1] == fingerprint.split()[:1] and not fresh:
        # The module is unchanged, so its mutants are the same: what ran keeps its result (with
        # --survivors, the survivors run again) against the tests and the rest of the package as
        # they are now; a larger --sample adds its mutants.
        _copy_repository(copy, files)
        config = (home / "cr.toml").read_text()
        (home / "cr.toml").write_text(
            re.sub(r"(?m)^test-command = .*$", lambda _: f"test-command = {json.dumps(command)}", config)
        )
        if survivors:
            with sqlite3.connect(db_path) as db:
                db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")
        if grow:
            print(f"{module}: {_grow(db_path, target, sample)} mutants added to the sample of {before}")
        stamp.write_text(f"{fingerprint} {sample if grow else before}")
        new = False
    if new and not report_only:
        home.mkdir(parents=True, exist_ok=True)
        _copy_repository(copy, files)
        db_path.unlink(missing_ok=True)
        seconds = _baseline(command, env, copy)
        timeout = max(120.0, timeout_factor * seconds)
        # TOML's basic strings are JSON strings.
        (home / "cr.toml").write_text(
            f"[cosmic-ray]\nmodule-path = {json.dumps(str(target))}\ntimeout = {timeout:.0f}\n"
            f"excluded-modules = []\ntest-command = {json.dumps(command)}\n"
            '[cosmic-ray.distributor]\nname = "local"\n'
        )
        subprocess.run(
            [sys.executable, "-m", "cosmic_ray.cli", "init", str(home / "cr.toml"), str(db_path)], cwd=copy, check=True
        )
        with use_db(str(db_path), WorkDB.Mode.open) as db:
            left = _skip(db, target, sample)
        stamp.write_text(f"{fingerprint} {sample}")
        print(f"{module}: {left} mutants to run against {len(tests)} test selections (baseline {seconds:.0f} s)")
    if not new and not report_only:
        # A cut run may have left its last mutant in the copy: the module as it is (unchanged).
        shutil.copy2(ROOT / "magistral_jax" / module, target)
    if report_only and not db_path.exists():
        print(f"note: {module}: no session under {home}")
        return None
    if report_only and stamped[:3] != fingerprint.split():
        print(f"note: {module}: the session ran against an earlier state of the code or tests")
    start = time.perf_counter()
    if not report_only:
        subprocess.run(
            [sys.executable, "-m", "cosmic_ray.cli", "exec", str(home / "cr.toml"), str(db_path)],
            cwd=copy,
            env=env,
            check=True,
        )
    seconds = time.perf_counter() - start
    source = target.read_text()
    lines, spans = source.splitlines(), _annotation_spans(source)
    killed = equivalent = timeouts = incompetent = 0
    survived = []
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            (m,) = item.mutations
            if _excluded(m, lines, spans):
                continue
            line = _line(lines, m)
            if result.test_outcome == TestOutcome.INCOMPETENT or result.worker_outcome != WorkerOutcome.NORMAL:
                incompetent += 1
            elif result.test_outcome == TestOutcome.SURVIVED and _equivalent(module, line, m, result.diff or ""):
                equivalent += 1
            elif result.test_outcome == TestOutcome.SURVIVED:
                survived.append((m.operator_name, f"{module}:{m.start_pos[0]}", result.diff or line))
            else:
                killed += 1
                timeouts += result.output == "timeout"
        pending = sum(1 for _ in db.pending_work_items)
    return Result(module, killed, survived, equivalent, timeouts, incompetent, pending, seconds)


def _count(module: str) -> int:
    from cosmic_ray.commands.init import _all_work_items

    target = ROOT / "magistral_jax" / module
    source = target.read_text()
    lines, spans = source.splitlines(), _annotation_spans(source)
    return sum(not _excluded(item.mutations[0], lines, spans) for item in _all_work_items([target], {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules under magistral_jax/ (default all: {', '.join(MODULES)})")
    parser.add_argument(
        "--work-dir",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "magistral-jax-mutation"),
        help="where the copies, sessions and compilation cache live (default $TMPDIR/magistral-jax-mutation)",
    )
    parser.add_argument("--fresh", action="store_true", help="start every session over")
    parser.add_argument(
        "--timeout-factor", type=float, default=4.0, help="a mutant's test run may take this many baselines"
    )
    parser.add_argument(
        "--sample",
        type=int,
        help="run a seeded random sample of this many mutants per module (0: all; default: all, or a "
        "session's own sample); a larger sample (or 0) later adds to a session's mutants, keeping what ran",
    )
    parser.add_argument("--report", action="store_true", help="report the sessions run so far, run nothing")
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="after adding tests (the module itself unchanged): run again only the mutants that survived",
    )
    parser.add_argument("--list", action="store_true", help="list the modules, their tests and mutant counts")
    args = parser.parse_args(argv)
    modules = args.modules or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; expected some of {', '.join(MODULES)}")
    if args.list:
        for m in modules:
            print(f"{m}: {_count(m)} mutants; tests: {' '.join(MODULES[m])}")
        return 0
    everything = [
        run_module(m, Path(args.work_dir), args.fresh, args.timeout_factor, args.sample, args.report, args.survivors)
        for m in modules
    ]
    results = [r for r in everything if r is not None]
    for r in results:
        for operator, where, diff in r.survived:
            print(f"\nsurvived: {where} {operator}\n{diff}")
    print()
    for r in results:
        n = r.killed + len(r.survived)
        print(
            f"{r.module}: {r.killed}/{n} killed ({100 * r.killed / max(n, 1):.1f} %); "
            f"{len(r.survived)} survived, {r.equivalent} equivalent, {r.timeouts} killed by the timeout, "
            f"{r.incompetent} incompetent"
            + (f", {r.pending} not run yet" if r.pending else "")
            + f"; {r.seconds / 60:.1f} min"
        )
    killed = sum(r.killed for r in results)
    total = sum(r.killed + len(r.survived) for r in results)
    print(f"mutation score: {killed}/{total} killed ({100 * killed / max(total, 1):.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
