"""`magistral-jax generate`: chat with a checkpoint, streaming the thinking and the answer apart."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# The sampler's key is drawn from 32 bits of the seed (JAX's default, without x64): larger seeds
# would silently repeat smaller ones.
MAX_SEED = 2**32 - 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="chat with a checkpoint, streaming the thinking and the answer apart",
        description=(
            "Encodes PROMPT (and any --image) in the Magistral chat format, system prompt included, "
            "samples a completion with the KV-cache sampler and prints it as it is generated: the "
            "thinking dimmed on a terminal (or under its own heading when the output is not a "
            "terminal), the answer plainly, and tokens/s at the end. With --json, prints one JSON "
            "object per sample instead."
        ),
    )
    add_checkpoint_options(p)
    add_cache_options(p)
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="an image shown with the prompt (repeat for several; needs a checkpoint with a vision encoder)",
    )
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7, as the model cards)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p filter (default 0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="completion budget (default 1024)")
    p.add_argument("--n", type=int, default=1, help="samples (default 1; more than one are printed at the end)")
    p.add_argument("--seed", type=int, default=0, help=f"random seed, 0 to {MAX_SEED} (default 0)")
    p.add_argument("--chunk", type=int, default=8, help="tokens per streamed chunk (default 8)")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per sample instead of streaming text (strict JSON: a log-probability that is "
        "not finite, from NaN or Inf in the weights, is null)",
    )
    p.set_defaults(run=run)


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    """The options that pick a checkpoint, its tokenizer and system prompt, and how to hold it."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory: any format load_model reads, or a training run directory (its --step checkpoint, "
        "with the tokenizer and system prompt it was trained with)",
    )
    p.add_argument(
        "--step",
        default="best",
        help="for a training run directory: best (the best evaluated checkpoint, else the latest), latest, or a "
        "step number (default best)",
    )
    p.add_argument(
        "--system-prompt",
        default="default",
        help="'default' (the checkpoint's SYSTEM_PROMPT.txt if it has one, else the model family's "
        "published prompt), 'none', or a text file",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer file (default: tekken.json or tokenizer.model* in the checkpoint, or the run config's)",
    )
    p.add_argument("--dtype", default="bfloat16", help="parameter and compute dtype (default bfloat16)")
    p.add_argument("--mesh", default="", help="device mesh, e.g. data=1,fsdp=2,tensor=4 (default: one device)")


def add_cache_options(p: argparse.ArgumentParser) -> None:
    """The options that pick the sampler's KV cache (`make_sampler_of`)."""
    p.add_argument(
        "--cache",
        choices=("contiguous", "paged"),
        default="contiguous",
        help="the KV cache: contiguous (each sample reserves its prompt plus the whole budget; takes images) or "
        "paged (pages filled as the tokens come, a prompt's pages shared by its samples; text only) "
        "(default contiguous)",
    )
    p.add_argument("--page-size", type=int, default=64, help="paged: tokens per page, a divisor of 128 (default 64)")
    p.add_argument(
        "--pool-tokens",
        type=int,
        default=0,
        help="paged: the pool's size in tokens; samples that outgrow it are preempted and decoded again "
        "(default 0: what the contiguous cache would hold)",
    )


def make_sampler_of(model, stop_ids, args: argparse.Namespace):
    """The sampler `add_cache_options`' options ask for."""
    from magistral_jax.sampling.continuous import make_sampler

    return make_sampler(model, stop_ids, args.cache, args.page_size, args.pool_tokens or None)


def open_for_sampling(args: argparse.Namespace):
    """(model, tokenizer, system prompt) from the options of `add_checkpoint_options`."""
    from magistral_jax import load_model
    from magistral_jax.checkpoint.runs import FILES, RUN_CONFIG, is_run_dir
    from magistral_jax.sharding import make_mesh, parse_mesh
    from magistral_jax.tokenizer import TOKENIZER_FILES, load_tokenizer, resolve_system_prompt

    if not os.path.isdir(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint}: not a directory")
    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    tokenizer_path, side_files = args.tokenizer, args.checkpoint
    if is_run_dir(args.checkpoint):
        # The tokenizer and system prompt the run trained with, else (older runs) its config's tokenizer.
        side_files = os.path.join(args.checkpoint, FILES)
        if tokenizer_path is None and not any(os.path.exists(os.path.join(side_files, f)) for f in TOKENIZER_FILES):
            from magistral_jax.train.config import load_run_config

            tokenizer_path = load_run_config(os.path.join(args.checkpoint, RUN_CONFIG)).tokenizer
            if tokenizer_path is None:
                raise ValueError(f"{args.checkpoint}: the run names no tokenizer; pass --tokenizer FILE")
    model = load_model(args.checkpoint, mesh=mesh, dtype=args.dtype, step=args.step, progress=True)
    tokenizer = load_tokenizer(tokenizer_path or side_files)
    if tokenizer.vocab_size > model.cfg.text.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the model {model.cfg.text.vocab_size}: "
            "they do not belong together"
        )
    system = resolve_system_prompt(
        args.system_prompt, tokenizer, "chat", checkpoint=side_files, setting="--system-prompt"
    )
    return model, tokenizer, system


def check_sampling_options(args: argparse.Namespace) -> None:
    """Refuses sampling options the sampler would turn into garbage or a traceback: non-finite
    numbers (`--temperature inf` makes every draw uniform) and seeds beyond `MAX_SEED`."""
    for name in ("temperature", "top_p", "min_p"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--{name.replace('_', '-')}: a finite number >= 0 is expected, got {value}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed: an integer from 0 to {MAX_SEED} is expected, got {args.seed}")


def json_record(tokenizer, out, row: int) -> str:
    """Sample `row` of `out` as one line of strict JSON: a log-probability that is not finite (NaN
    or Inf weights give them) is null, never the `NaN` / `Infinity` strict parsers refuse."""
    ids = out.completion(row)
    r = tokenizer.split(ids)
    record = {
        "tokens": ids,
        "text": tokenizer.decode(ids, keep_special=True),
        "thinking": r.thinking,
        "answer": r.answer,
        "logprobs": [round(float(x), 6) if math.isfinite(x) else None for x in out.logprobs[row, : len(ids)]],
        "finish_reason": out.finish_reasons[row],
    }
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


class _Printer:
    """Prints the growing completion: thinking dimmed (or under a heading), then the answer."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.tty = out.isatty()
        self.ids: list[int] = []
        self.printed = {"thinking": "", "answer": ""}
        self.section: str | None = None

    def _emit(self, section: str, text: str) -> None:
        new = text[len(self.printed[section]) :] if text.startswith(self.printed[section]) else text
        if not new:
            return
        if section != self.section:
            if self.tty:
                self.out.write("\x1b[2m" if section == "thinking" else "\x1b[0m\n")
            else:
                self.out.write(("" if self.section is None else "\n") + f"--- {section} ---\n")
            self.section = section
        self.out.write(new)
        self.out.flush()
        self.printed[section] = text

    def add(self, ids: list[int]) -> None:
        self.ids += ids
        r = self.tokenizer.split(self.ids, strip=False)
        if r.thinking is not None:
            self._emit("thinking", r.thinking.lstrip())
        if r.answer:
            self._emit("answer", r.answer.lstrip() if r.thinking is not None else r.answer)

    def close(self) -> None:
        if self.tty and self.section == "thinking":
            self.out.write("\x1b[0m")
        self.out.write("\n")


def run(args: argparse.Namespace) -> int:
    from magistral_jax.sampling import SamplingParams

    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    check_sampling_options(args)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p)
    for name in ("max_new_tokens", "n", "chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: a positive integer is expected")
    from magistral_jax.images import load_image

    images = [load_image(path) for path in args.image]
    model, tokenizer, system = open_for_sampling(args)
    if images and model.cfg.vision is None:
        raise ValueError(f"--image: {args.checkpoint} has no vision encoder")
    if images:
        prompt, pixels = tokenizer.encode_chat_with_images(args.prompt, images, system)
        image_inputs = [pixels]
    else:
        prompt, image_inputs = tokenizer.encode_chat(args.prompt, system), None
    sampler = make_sampler_of(model, (tokenizer.eos_id,), args)
    start = time.perf_counter()
    if args.json or args.n > 1:
        out = sampler.sample(
            [prompt],
            max_new_tokens=args.max_new_tokens,
            n=args.n,
            sampling=sampling,
            seed=args.seed,
            images=image_inputs,
        )
    else:
        printer = _Printer(tokenizer, sys.stdout)
        for chunk in sampler.stream(
            [prompt],
            max_new_tokens=args.max_new_tokens,
            sampling=sampling,
            seed=args.seed,
            chunk=args.chunk,
            images=image_inputs,
        ):
            printer.add(chunk.tokens[0])
            out = chunk.output
        printer.close()
    seconds = time.perf_counter() - start
    for row in range(len(out.lengths)):
        if args.json:
            print(json_record(tokenizer, out, row))
            continue
        ids = out.completion(row)
        r = tokenizer.split(ids)
        if args.n > 1:
            print(f"=== sample {row + 1}/{args.n} ({out.finish_reasons[row]}) ===")
            if r.thinking is not None:
                print(f"--- thinking ---\n{r.thinking}\n--- answer ---")
            print(r.answer)
    total = int(out.lengths.sum())
    if not args.json:
        print(
            f"[{total} tokens in {seconds:.2f} s: {total / seconds:.1f} tokens/s, compilation included; "
            f"prompt {len(prompt)} tokens; finish: {', '.join(out.finish_reasons)}]",
            file=sys.stderr,
        )
    return 0
