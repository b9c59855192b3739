"""`magistral-jax demo`: a tiny model learns to reason in the Magistral format, on the CPU, in minutes.

1. Data: generated multilingual math problems (arithmetic in English, French, Spanish, Italian,
   German, Chinese and Russian) with worked traces in the Magistral format
   (`[THINK]...[/THINK]... \\boxed{}`), tokenized with the Tekken v13 stand-in; the model's
   vocabulary is the subset of Tekken ids the problems use.
2. SFT cold start on the traces. They are imperfect on purpose, as distilled traces are: half of
   them box a number of the problem instead of the result their reasoning reached, and 30% reason
   in English whatever the problem's language.
3. GRPO with the real Magistral reward (format, math-verify correctness, length, language
   consistency) on problems the SFT never saw: it has to unlearn both mistakes.
4. Evaluation before and after GRPO on held-out problems, as the paper evaluates (pass@1 averaged
   over samples at temperature 0.7): a table of accuracy, format rate, language consistency and
   mean length, the reward curve as a PNG, and the metrics of both
   runs (`sft/`, `grpo/` with metrics.jsonl and TensorBoard events).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import sys
import time

from magistral_jax.cli.devices import simulate_devices


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="a tiny model learns to reason with SFT then GRPO on the CPU (the embedded default job)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sft-steps", type=int, default=150, help="SFT steps (default 150)")
    p.add_argument("--grpo-steps", type=int, default=60, help="GRPO steps (default 60)")
    p.add_argument("--eval-problems", type=int, default=16, help="held-out problems per language (default 16)")
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out; must not hold a run)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="simulated CPU devices for a data x fsdp mesh when running on the CPU (default 1)",
    )
    p.add_argument(
        "--async",
        dest="asynchronous",
        action="store_true",
        help="GRPO asynchronously: half the devices generate (continuous batching, weights swapped in flight), "
        "half train (needs --devices 2 or more)",
    )
    p.set_defaults(run=run)


def recipe(name: str) -> str:
    """The path of a recipe of the repository's `configs/` (a source checkout, or the copy a package
    install puts under `<prefix>/share/magistral-jax/configs`)."""
    from magistral_jax.config import ConfigError

    here = os.path.dirname(os.path.abspath(__file__))
    for root in (
        os.path.join(here, os.pardir, os.pardir, "configs"),
        os.path.join(sys.prefix, "share", "magistral-jax", "configs"),
    ):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return os.path.normpath(path)
    raise ConfigError(f"configs/{name}: not found beside the package nor under {sys.prefix}/share/magistral-jax")


LEVELS = (1, 3)  # one-digit addition and multiplication
# The cold-start traces are imperfect, as distilled traces are: in some the boxed answer repeats
# a number of the problem instead of the result the reasoning reached, in some the reasoning is in
# English whatever the problem's language. GRPO with the verifier and the language reward has
# to unlearn both.
WRONG_ANSWER_RATE, ENGLISH_THINKING_RATE = 0.5, 0.3


def make_problems(seed: int, per_language: int):
    from magistral_jax.data.generated import LANGUAGES, math_problem
    from magistral_jax.data.problems import Problem

    rng = random.Random(seed)
    out = []
    for k in range(per_language):
        for language in LANGUAGES:
            row = math_problem(rng, language, LEVELS[k % len(LEVELS)])
            out.append(
                Problem(
                    id=f"demo-{seed}-{language}-{k}",
                    problem=row["problem"],
                    answer=row["answer"],
                    language=language,
                    level=row["level"],
                    trace=row["trace"],
                )
            )
    return out


def cold_start_trace(p, rng: random.Random) -> str:
    """`p`'s trace, with the cold start's deliberate mistakes at their rates."""
    from magistral_jax.data.generated import ANSWER, SAY_ADD, SAY_MUL

    a, b = (int(x) for x in re.findall(r"\d+", p.problem)[:2])
    think = (SAY_ADD if p.level == 1 else SAY_MUL)[
        "english" if rng.random() < ENGLISH_THINKING_RATE else p.language
    ].format(a=a, b=b, r=p.answer)
    boxed = a if rng.random() < WRONG_ANSWER_RATE else p.answer
    return f"[THINK]{think}[/THINK]{ANSWER[p.language].format(r=boxed)}"


EVAL_SAMPLES, EVAL_TEMPERATURE = 4, 0.7


def evaluate(model, tokenizer, problems, seed: int) -> dict:
    """The paper's protocol, small: pass@1 averaged over `EVAL_SAMPLES` samples per problem at
    temperature 0.7, scored by the Magistral reward."""
    from magistral_jax.evaluation import sample_and_score, summarize
    from magistral_jax.sampling import SamplingParams

    samples = sample_and_score(
        model,
        tokenizer,
        problems,
        k=EVAL_SAMPLES,
        max_new_tokens=64,
        sampling=SamplingParams(temperature=EVAL_TEMPERATURE),
        seed=seed,
        batch_problems=len(problems),
        progress=False,
    )
    return summarize(problems, samples, EVAL_SAMPLES)


def run(args: argparse.Namespace) -> int:
    for name in ("sft_steps", "grpo_steps", "eval_problems", "devices"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.asynchronous and args.devices < 2:
        raise ValueError("--async needs --devices 2 or more (one set generates, the other trains)")
    if os.path.exists(os.path.join(args.out, "sft")) or os.path.exists(os.path.join(args.out, "grpo")):
        raise ValueError(f"{args.out}: holds a previous demo run; remove it or pass --out")
    simulate_devices(args.devices)

    import jax

    from magistral_jax import init_model, make_mesh
    from magistral_jax.data.problems import ProblemSource
    from magistral_jax.data.procedural import Example
    from magistral_jax.data.sources import problem_fields
    from magistral_jax.tokenizer import SubsetTokenizer, load_tokenizer, write_standin_tekken
    from magistral_jax.train.config import load_run_config
    from magistral_jax.train.loop import run as train

    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    noise = random.Random(args.seed)
    sft_set = [dataclasses.replace(p, trace=cold_start_trace(p, noise)) for p in make_problems(args.seed * 3 + 1, 200)]
    grpo_set = make_problems(args.seed * 3 + 2, 200)
    eval_set = make_problems(args.seed * 3 + 3, args.eval_problems)
    base = load_tokenizer(write_standin_tekken(os.path.join(args.out, "tekken.json")))
    corpus = []
    for p in sft_set + grpo_set + eval_set:
        corpus += base.encode_chat(p.problem) + base.encode_completion(p.trace)
    tokenizer = SubsetTokenizer(base, corpus)
    from magistral_jax.checkpoint.configs import read_config

    cfg = read_config(recipe("demo-model.yaml")).replace(**{"text.vocab_size": tokenizer.vocab_size})
    n_dev = len(jax.devices())
    mesh = make_mesh(data=2 if n_dev % 2 == 0 and n_dev > 1 else 1, fsdp=-1) if n_dev > 1 else None
    model = init_model(cfg, args.seed, mesh=mesh)
    n_params = sum(x.size for x in jax.tree.leaves(model.params))
    print(
        f"demo: a {n_params / 1e6:.1f}M-parameter decoder ({cfg.text.n_layers} layers, dim {cfg.text.dim}, "
        f"{tokenizer.vocab_size} Tekken ids) on {n_dev} {jax.default_backend()} device(s)"
    )
    print(
        "demo: task = one-digit addition and multiplication word problems in 7 languages, answered as "
        "[THINK]reasoning[/THINK]answer \\boxed{n}"
    )

    def encoder(with_trace: bool):
        def encode(p) -> Example:
            answer = tokenizer.encode_completion(p.trace) if with_trace else None
            return Example(tokenizer.encode_chat(p.problem), answer, problem_fields(p))

        return encode

    def run_overrides(kind: str, steps: int) -> list[str]:
        where = os.path.join(args.out, kind)
        return [f"run_dir={where}", f"steps={steps}", f"checkpoint_every={steps}", f"seed={args.seed}"]

    sft = load_run_config(recipe("demo-sft.yaml"), run_overrides("sft", args.sft_steps))
    print(f"demo: SFT cold start, {args.sft_steps} steps on worked traces")
    train(sft, tokenizer=tokenizer, source=ProblemSource(sft_set, encoder(True), seed=args.seed), model=model)
    before = evaluate(model, tokenizer, eval_set, args.seed)

    overrides = run_overrides("grpo", args.grpo_steps)
    if args.asynchronous:
        longest = max(len(tokenizer.encode_chat(p.problem)) for p in grpo_set)
        overrides += ["async_rl.enabled=true", f"async_rl.generator_devices={n_dev // 2}"]
        overrides += [f"async_rl.trainer_devices={n_dev - n_dev // 2}", f"async_rl.max_prompt_len={longest}"]
    grpo = load_run_config(recipe("demo-grpo.yaml"), overrides)
    mode = f"asynchronous, {n_dev // 2} generator / {n_dev - n_dev // 2} trainer devices" if args.asynchronous else ""
    print(f"demo: GRPO, {args.grpo_steps} steps with the Magistral reward on unseen problems {mode}".rstrip())
    train(grpo, tokenizer=tokenizer, source=ProblemSource(grpo_set, encoder(False), seed=args.seed), model=model)
    after = evaluate(model, tokenizer, eval_set, args.seed)

    with open(os.path.join(args.out, "grpo", "metrics.jsonl")) as f:
        rewards = [json.loads(line)["reward_mean"] for line in f]
    plot = _plot(rewards, os.path.join(args.out, "reward.png"))
    report = {"before_grpo": before, "after_grpo": after, "seconds": time.perf_counter() - start}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(
        f"\nheld-out problems: {len(eval_set)} ({args.eval_problems} per language), {EVAL_SAMPLES} samples each "
        f"at temperature {EVAL_TEMPERATURE}"
    )
    print(f"{'':<22}{'after SFT':>12}{'after GRPO':>12}")
    for key, label in (
        ("pass@1", "accuracy"),
        ("format", "format rate"),
        ("language", "language consistency"),
        ("length", "mean length"),
    ):
        fmt = "{:>12.1f}" if key == "length" else "{:>12.0%}"
        print(f"{label:<22}" + fmt.format(before[key]) + fmt.format(after[key]))
    print(
        f"\ndemo: wrote {plot}, {os.path.join(args.out, 'report.json')} and the runs in {args.out}/sft, "
        f"{args.out}/grpo ({report['seconds']:.0f} s)"
    )
    return 0


def _plot(rewards: list[float], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.arange(1, len(rewards) + 1)
    window = max(1, min(10, len(rewards) // 3))
    smooth = np.convolve(rewards, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, rewards, alpha=0.35, label="per step (16 prompts x 8 samples)")
    ax.plot(steps[window - 1 :], smooth, label=f"mean of the last {window} steps")
    ax.legend(loc="lower right")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward (max 1.1)")
    ax.set_title("magistral-jax demo: GRPO with the Magistral reward")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
