"""Every command and snippet of the README runs as written, at tiny scale, from a working directory
that is not the repository's.

The README's ```bash blocks are split into commands (continued lines joined, shell quoting undone,
`&&` separating two); each `magistral-jax` command runs in this process through
`magistral_jax.cli.main` with the few arguments of `TINY` appended (a smaller budget, fewer steps),
`configs/...` pointing at the repository's, and must exit 0. Its ```python blocks run in one
namespace, in README order, as a reader runs them in one session; its ```yaml blocks load as run
configs. The files the README names (`Magistral-Small-2509/`, `problems.jsonl`, `aime24.parquet`,
`run.yaml`, `my_pkg`, ...) are tiny stand-ins made here under those names. A command that cannot
run here is in `NOT_RUN` with the reason; any other command is run, so a new one is handled. The
same holds for the command lines in the `--help` texts. The tiny chain of "The Magistral recipe, end
to end" is tests/test_recipe_chain.py's.
"""

import contextlib
import csv
import io
import json
import os
import shlex
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import GPQA_HEADER, ROOT, lcb_compressed, readme_blocks

from magistral_jax.cli import build_parser, main

RECIPE = "### The Magistral recipe, end to end"
# The blocks tests/test_recipe_chain.py runs: the stand-in's snippet and the tiny chain.
CHAIN = (readme_blocks("python", RECIPE)[0], readme_blocks("bash", RECIPE)[0])

# Commands that do not run here, by their first words, and why.
NOT_RUN = {
    ("pip", "install"): "installs the package: the suite runs in an installed environment",
    ("pytest", "-n", "2"): "the whole suite, this test included",
    ("magistral-jax", "demo"): "minutes on 2 cores; tests/test_cli.py runs it, shortened",
    ("magistral-jax", "train", "sft", "--config", "configs/sft-magistral-small.yaml"): (
        "the 24B cold start on a pod; tests/test_recipe_chain.py runs this recipe at tiny size"
    ),
    ("magistral-jax", "train", "grpo", "--config", "configs/grpo-magistral-small.yaml"): (
        "the 24B GRPO run on a pod; tests/test_recipe_chain.py runs this recipe at tiny size"
    ),
    ("magistral-jax", "export", "runs/grpo-magistral-small"): (
        "the 24B run above; tests/test_recipe_chain.py exports its tiny run, and the Training commands export theirs"
    ),
    ("vllm", "serve"): "vLLM is not installed here; tests/test_recipe_chain.py serves the export with transformers",
    ("magistral-jax", "train", "sft", "--config", "run.yaml", "--coordinator"): (
        "waits for the job's other process; tests/test_multihost.py runs two"
    ),
    ("magistral-jax", "plan"): (
        "compiles the 24B for a TPU slice with libtpu (minutes per program); tests/test_plan.py covers the same paths"
    ),
    ("nice", "-n", "10", "python", "tools/mutation.py"): "mutation testing: hours on 2 cores",
    ("python", "tools/mutation.py"): "mutation testing: hours on 2 cores",
}

# Arguments appended to a `magistral-jax` command (by its first words) to run it at tiny scale.
TINY = {
    ("generate",): ["--max-new-tokens", "8"],
    ("train", "sft"): ["steps=2", "sft.batch_size=8", "checkpoint_every=1"],
    ("train", "grpo"): ["steps=2", "grpo.prompts_per_step=2", "grpo.group_size=4", "checkpoint_every=1"],
    ("train", "grpo", "--config", "configs/grpo-tiny-async.yaml"): [
        "steps=2",
        "grpo.prompts_per_step=2",
        "grpo.group_size=4",
        "async_rl.slots=8",
        "async_rl.chunk=4",
    ],
    ("eval",): ["--k", "2", "--max-new-tokens", "8", "--limit", "2", "--workers", "0"],
    ("filter",): ["--k", "2", "--max-new-tokens", "8", "--workers", "0"],
    ("score",): ["--workers", "0"],
}
# Python snippets at tiny scale: (text, its replacement); the text must be in the README.
SMALLER = [("max_new_tokens=512", "max_new_tokens=16")]


def _commands(text: str) -> list[list[str]]:
    """The commands of a shell block: continued lines joined, comments dropped, `&&` splitting."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            n = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:n])
            words = words[n + 1 :]
    return commands


def _help_commands() -> list[list[str]]:
    """The `magistral-jax ...` command lines in the `--help` texts of every subcommand."""
    found, parsers = [], [build_parser()]
    while parsers:
        parser = parsers.pop()
        for text in (parser.description or "", parser.epilog or ""):
            found += [shlex.split(line) for line in text.splitlines() if line.strip().startswith("magistral-jax ")]
        parsers += [p for a in parser._actions if isinstance(a.choices, dict) for p in a.choices.values()]
    return found


def _not_run(argv: list[str]) -> tuple[str, ...] | None:
    return next((key for key in NOT_RUN if tuple(argv[: len(key)]) == key), None)


def _documented() -> list[tuple[str, object]]:
    """What the README and the help texts give to run, in order: ("bash", argv), ("python", code),
    ("yaml", text); the recipe chain left out."""
    items = []
    for block in readme_blocks():
        if block in CHAIN or block.language == "":  # "" = printed output
            continue
        assert block.language in ("bash", "python", "yaml"), f"{block.section}: a ```{block.language} block"
        if block.language == "bash":
            items += [("bash", argv) for argv in _commands(block.text)]
        else:
            items.append((block.language, block.text))
    return items + [("bash", argv) for argv in _help_commands()]


def test_every_documented_command_is_run_or_listed_with_a_reason():
    commands = [argv for kind, argv in _documented() if kind == "bash"]
    assert len(commands) >= 30, commands
    neither = [shlex.join(a) for a in commands if a[0] != "magistral-jax" and _not_run(a) is None]
    assert not neither, f"README commands neither run (magistral-jax) nor in NOT_RUN: {neither}"
    stale = [key for key in NOT_RUN if not any(_not_run(a) == key for a in commands)]
    assert not stale, f"NOT_RUN entries that match no documented command: {stale}"
    assert all(any(text in code for kind, code in _documented() if kind == "python") for text, _ in SMALLER)
    # Every TINY prefix is a command the README runs.
    ran = [a[1:] for a in commands if a[0] == "magistral-jax" and _not_run(a) is None]
    assert all(any(tuple(a[: len(key)]) == key for a in ran) for key in TINY)


# --- the files the README names -----------------------------------------------------------------

PROBLEMS = [
    {"id": "apples", "problem": "Tom has 3 apples and gets 4 more. How many apples does Tom have now?",
     "answer": "7", "language": "english"},
    {"id": "billes", "problem": "Léa a 12 billes et en donne 5. Combien de billes lui reste-t-il ?",
     "answer": "7", "language": "french"},
    {"id": "area", "problem": "A rectangle is 2.5 m by 4 m. What is its area in square metres?", "answer": "10"},
]  # fmt: skip
COMPLETIONS = [
    {"id": "apples", "completion": "[THINK]3 + 4 = 7.[/THINK]Tom has \\boxed{7} apples."},
    {"id": "billes", "completion": "[THINK]12 - 5 = 7.[/THINK]Il lui reste \\boxed{7} billes."},
    {"id": "area", "completion": "[THINK]2.5 x 4 = 10[/THINK]The area is \\boxed{10.0} square metres."},
]
GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                 "May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
]  # fmt: skip
LCB_TESTS = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}, {"input": "5 -4\n", "output": "1\n",
                                                                         "testtype": "stdin"}]  # fmt: skip
RUN_YAML = """\
kind: grpo
model: tiny
run_dir: runs/my-run
microbatch_tokens: 2048
grpo: {max_new_tokens: 8, reward_workers: 0}
data: {name: random_prompts, max_len: 6}
reward: {name: token_frequency, token: 7}
"""
MY_REWARD = '''
def my_reward(prompts, completions, *, completion_ids, **fields):
    """The share of even token ids."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]
'''
MY_SOURCE = """
from magistral_jax.data.procedural import Example


class Counting:
    def __init__(self, seed, max_len):
        self.seed, self.max_len, self.index = seed, max_len, 0

    def next(self, n):
        out = [Example([3 + (self.seed + self.index + i) % 9] * self.max_len) for i in range(n)]
        self.index += n
        return out

    def state(self):
        return {"index": self.index}

    def restore(self, state):
        self.index = state["index"]


def my_source(seed, max_len=4, tokenizer=None):
    return Counting(seed, max_len)
"""


def _jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _stand_ins(work):
    import hf_reference as R

    from magistral_jax.tokenizer import write_standin_tekken

    # Magistral Small 2509's layout (Mistral3, text and vision, as transformers writes it) with all
    # 131,072 Tekken ids, so that the README's ids (22177, ...) are valid.
    checkpoint = work / "Magistral-Small-2509"
    R.mistral3(seed=3, vocab=131072, dim=32, layers=1, heads=4, kv_heads=2, head_dim=8, hidden=48).save_pretrained(
        checkpoint
    )
    write_standin_tekken(checkpoint / "tekken.json")
    (work / "path/to").mkdir(parents=True)
    os.symlink(checkpoint, work / "path/to/hf-checkpoint")
    os.symlink(checkpoint, work / "Mistral-Small-3.2-24B-Instruct-2506")
    _jsonl(work / "problems.jsonl", PROBLEMS)
    _jsonl(work / "completions.jsonl", COMPLETIONS)
    for name in ("gsm8k-test.parquet", "gsm8k-train.parquet"):
        pq.write_table(pa.Table.from_pylist(GSM8K), work / name)
    # GSM8K has no id column: a row is named by its file and number.
    _jsonl(work / "c.jsonl", [{"id": "gsm8k-test.parquet row 1", "completion": "[THINK]48 + 24[/THINK]\\boxed{72}"}])
    # The benchmarks in their published schemas: Maxwell-Jia/AIME_2024, the GPQA CSV, LiveCodeBench.
    aime = [{"ID": "2024-I-2", "Problem": "Find $x + y$ if $x = 12$ and $y = 13$.", "Solution": "...", "Answer": 25},
            {"ID": "2024-I-3", "Problem": "Find $2^{10} \\bmod 1000$.", "Solution": "...", "Answer": 24}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(aime), work / "aime24.parquet")
    with open(work / "gpqa_diamond.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, GPQA_HEADER)
        writer.writeheader()
        row = {"Pre-Revision Question": "old", "Question": "Which particle mediates the weak force?",
               "Correct Answer": " W and Z bosons\n", "Incorrect Answer 1": "photons", "Incorrect Answer 2": "gluons",
               "Incorrect Answer 3": "gravitons", "Explanation": "long,\nmulti-line", "Record ID": "rec0",
               "High-level domain": "Physics"}  # fmt: skip
        writer.writerow(row)
    lcb = {"question_title": "Sum", "question_content": "Read a and b; print a + b.", "platform": "atcoder",
           "question_id": "abc001_a", "contest_id": "abc001", "contest_date": "2024-08-03T00:00:00",
           "starter_code": "", "difficulty": "easy", "public_test_cases": json.dumps(LCB_TESTS[:1]),
           "private_test_cases": lcb_compressed(LCB_TESTS[1:]), "metadata": "{}"}  # fmt: skip
    _jsonl(work / "livecodebench_v5.jsonl", [lcb])
    (work / "run.yaml").write_text(RUN_YAML)
    (work / "my_pkg").mkdir()
    (work / "my_pkg/__init__.py").write_text("")
    (work / "my_pkg/rewards.py").write_text(textwrap.dedent(MY_REWARD))
    (work / "my_pkg/data.py").write_text(textwrap.dedent(MY_SOURCE))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working directory with the README's files; `my_pkg` importable from it, as on PYTHONPATH."""
    work = tmp_path_factory.mktemp("readme")
    _stand_ins(work)
    cwd, path, pythonpath = os.getcwd(), list(sys.path), os.environ.get("PYTHONPATH")
    os.chdir(work)
    sys.path.insert(0, str(work))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(work), pythonpath) if p)
    try:
        yield work
    finally:
        os.chdir(cwd)
        sys.path[:] = path
        sys.modules.pop("my_pkg", None)
        for name in ("my_pkg.rewards", "my_pkg.data"):
            sys.modules.pop(name, None)
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath


# --- running them ---------------------------------------------------------------------------------


def _tiny(argv: list[str]) -> list[str]:
    """`argv` (after `magistral-jax`) with `configs/` made absolute and the TINY arguments appended."""
    keys = [key for key in TINY if tuple(argv[: len(key)]) == key]
    argv = argv + (TINY[max(keys, key=len)] if keys else [])
    return [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in argv]


def _run_command(argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(_tiny(argv[1:]))
        except SystemExit as e:  # argparse refusing the command line
            code = e.code
    assert code == 0, f"{shlex.join(argv)} exited {code}: {err.getvalue()[-3000:]}"


def _load_yaml(text: str, work) -> None:
    """A README config fragment is part of a valid run config, and its data section reads."""
    from magistral_jax.data.sources import make_source
    from magistral_jax.tokenizer import load_tokenizer
    from magistral_jax.train.config import load_run_config

    (work / "fragment.yaml").write_text(text)
    cfg = load_run_config("fragment.yaml", kind="grpo")
    if cfg.data.get("path") == "gsm8k-train.parquet":  # the GSM8K example: its answers read after `####`
        source = make_source(cfg.data, seed=0, tokenizer=load_tokenizer("Magistral-Small-2509/"))
        assert sorted(e.fields["answer"] for e in source.next(2)) == ["10", "72"]


def test_the_readme_runs_as_written(work):
    namespace = {"__name__": "readme"}
    ran = 0
    for kind, item in _documented():
        if kind == "bash":
            if item[0] != "magistral-jax" or _not_run(item) is not None:
                continue
            _run_command(item)
        elif kind == "python":
            for text, smaller in SMALLER:
                item = item.replace(text, smaller)
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(item, "README.md", "exec"), namespace)
        else:
            _load_yaml(item, work)
        ran += 1
    assert ran >= 20
    # What the snippets and commands made is there.
    assert np.isfinite(np.asarray(namespace["logits"])).all()
    assert (work / "grpo-tiny-hf/config.json").is_file() and (work / "eval_out/report.json").is_file()
