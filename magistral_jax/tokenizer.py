"""Tokenizers, the Magistral chat format, and splitting a completion into thinking and answer.

Tokenizers are mistral-common's own (Tekken `tekken.json`, or the SentencePiece
`tokenizer.model.v*` files), so chats are encoded exactly as the models were trained:
`<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]user[/INST]`, with no spaces around control tokens.

Reasoning comes in two styles:
- `think_tokens` (Magistral Small 2507 / 2509, Tekken v13): `[THINK]` (id 34) and `[/THINK]` (35) are
  control tokens; text written as `[THINK]...[/THINK]` in a message is encoded as those tokens;
- `think_tags` (Magistral Small 2506): plain-text `<think>` / `</think>` tags.
The style follows from the tokenizer: one with a `[THINK]` control token thinks in tokens.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

THINK, END_THINK = "[THINK]", "[/THINK]"
THINK_TAG, END_THINK_TAG = "<think>", "</think>"

# The models' default system prompts (reference/architecture-and-checkpoints.md, section 5).
# 2507 and 2509 share one; `[THINK]`/`[/THINK]` in it are the control tokens.
SYSTEM_PROMPTS: dict[str, str] = {
    "magistral-small-2509": (
        "First draft your thinking process (inner monologue) until you arrive at a response. Format your "
        "response using Markdown, and use LaTeX for any mathematical equations. Write both your thoughts and "
        "the response in the same language as the input.\n\nYour thinking process must follow the template "
        "below:[THINK]Your thoughts or/and draft, like working through an exercise on scratch paper. Be as "
        "casual and as long as you want until you are confident to generate the response. Use the same "
        "language as the input.[/THINK]Here, provide a self-contained response."
    ),
    "magistral-small-2506": (
        "A user will ask you to solve a task. You should first draft your thinking process (inner monologue) "
        "until you have derived the final answer. Afterwards, write a self-contained summary of your thoughts "
        "(i.e. your summary should be succinct but contain all the critical steps you needed to reach the "
        "conclusion). You should use Markdown to format your response. Write both your thoughts and summary in "
        "the same language as the task posed by the user. NEVER use \\boxed{} in your response.\n\nYour thinking "
        "process must follow the template below:\n<think>\nYour thoughts or/and draft, like working through an "
        "exercise on scratch paper. Be as casual and as long as you want until you are confident to generate a "
        "correct answer.\n</think>\n\nHere, provide a concise summary that reflects your reasoning and presents a "
        "clear final answer to the user. Don't mention that this is a summary.\n\nProblem:"
    ),
}
SYSTEM_PROMPTS["magistral-small-2507"] = SYSTEM_PROMPTS["magistral-small-2509"]
# The prompt of the paper's RL runs (Fig. 2, "utilized for both mathematical and coding problems"),
# in the `<think>` style. Unlike the 2506 card's chat prompt it does not forbid `\boxed{}`, which the
# math format reward requires.
SYSTEM_PROMPTS["magistral-rl"] = (
    "A user will ask you to solve a task. You should first draft your thinking process (inner monologue) "
    "until you have derived the final answer. Afterwards, write a self-contained summary of your thoughts "
    "(i.e. your summary should be succinct but contain all the critical steps you needed to reach the "
    "conclusion). You should use Markdown and Latex to format your response. Write both your thoughts and "
    "summary in the same language as the task posed by the user.\n\nYour thinking process must follow the "
    "template below:\n<think>\nYour thoughts or/and draft, like working through an exercise on scratch paper. "
    "Be as casual and as long as you want until you are confident to generate a correct answer.\n</think>\n\n"
    "Here, provide a concise summary that reflects your reasoning and presents a clear final answer to the "
    "user.\n\nProblem:"
)
# What `generate` says by default (the model cards' prompts) and what training data uses by default
# (the same where it agrees with the reward's format; the paper's RL prompt for the `<think>` style).
DEFAULT_SYSTEM_PROMPT = {"think_tokens": "magistral-small-2509", "think_tags": "magistral-small-2506"}
TRAINING_SYSTEM_PROMPT = {"think_tokens": "magistral-small-2509", "think_tags": "magistral-rl"}

Style = Literal["think_tokens", "think_tags"]


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable, or a chat cannot be encoded."""


@dataclass(frozen=True)
class Reasoning:
    """A completion split into its thinking and its answer.

    Attributes:
      thinking: the text inside the thinking block, or None when there is none.
      answer: the text after the block (the whole completion when there is no block).
      closed: False when a thinking block was opened and never closed (then `answer` is empty).
    """

    thinking: str | None
    answer: str
    closed: bool = True


def split_text(text: str, style: Style, strip: bool = True) -> Reasoning:
    """Splits decoded text whose markers are written out (`[THINK]` or `<think>` as text);
    `strip=False` keeps surrounding whitespace (for streaming)."""
    open_, close = (THINK, END_THINK) if style == "think_tokens" else (THINK_TAG, END_THINK_TAG)
    tidy = str.strip if strip else str
    start = text.find(open_)
    if start < 0:
        return Reasoning(None, tidy(text))
    rest = text[start + len(open_) :]
    end = rest.find(close)
    if end < 0:
        return Reasoning(tidy(rest), "", closed=False)
    return Reasoning(tidy(rest[:end]), tidy(rest[end + len(close) :]))


def _chunks(text: str) -> list[Any]:
    """`a[THINK]b[/THINK]c` -> [TextChunk a, ThinkChunk b, TextChunk c]."""
    from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk

    out: list[Any] = []
    for part in re.split(r"(\[THINK\].*?(?:\[/THINK\]|$))", text, flags=re.DOTALL):
        if not part:
            continue
        if part.startswith(THINK):
            closed = part.endswith(END_THINK)
            body = part[len(THINK) : len(part) - len(END_THINK) if closed else None]
            out.append(ThinkChunk(thinking=body, closed=closed))
        else:
            out.append(TextChunk(text=part))
    return out


class Tokenizer:
    """A mistral-common tokenizer with the chat format and reasoning split of Magistral."""

    def __init__(self, path: str):
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self.path = path
        try:
            self.mistral = MistralTokenizer.from_file(path)
        except Exception as e:  # mistral-common raises many types for unreadable files
            raise TokenizerError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
        self.raw = self.mistral.instruct_tokenizer.tokenizer
        self.think_id = self._special("[THINK]")
        self.end_think_id = self._special("[/THINK]")
        self.style: Style = "think_tokens" if self.think_id is not None else "think_tags"

    def _special(self, token: str) -> int | None:
        try:
            i = int(self.raw.get_special_token(token))
        except Exception:  # not in this vocabulary (Tekken raises)
            return None
        # SentencePiece answers unknown tokens with <unk>.
        return i if self.raw.id_to_piece(i) == token else None

    @property
    def bos_id(self) -> int:
        return int(self.raw.bos_id)

    @property
    def eos_id(self) -> int:
        return int(self.raw.eos_id)

    @property
    def vocab_size(self) -> int:
        return int(self.raw.n_words)

    def default_system_prompt(self) -> str:
        return SYSTEM_PROMPTS[DEFAULT_SYSTEM_PROMPT[self.style]]

    def training_system_prompt(self) -> str:
        return SYSTEM_PROMPTS[TRAINING_SYSTEM_PROMPT[self.style]]

    def encode_chat(self, messages: list[dict[str, str]] | str, system_prompt: str | None = None) -> list[int]:
        """Token ids of a chat ready for the assistant's turn.

        Args:
          messages: a user prompt, or `{"role": "user"|"assistant"|"system", "content": ...}` dicts.
          system_prompt: prepended as the system message (None: no system message).
        """
        return list(self._encode(messages, system_prompt, []).tokens)

    def encode_chat_with_images(
        self, messages: list[dict[str, str]] | str, images: list[Any], system_prompt: str | None = None
    ) -> tuple[list[int], list[Any]]:
        """Like `encode_chat`, with `images` (PIL images, uint8 arrays or encoded bytes) placed before
        the last user message's text, as mistral-common lays them out. Returns the ids and each
        image's preprocessed float32 `[3, H, W]` pixels."""
        from magistral_jax.images import to_pil

        if self.mistral.instruct_tokenizer.image_encoder is None:
            raise TokenizerError(f"{self.path}: this tokenizer has no image settings; it cannot encode images")
        pil = [to_pil(image, f"image {k}") for k, image in enumerate(images)]
        encoded = self._encode(messages, system_prompt, pil)
        return list(encoded.tokens), list(encoded.images)

    def _encode(self, messages: list[dict[str, str]] | str, system_prompt: str | None, images: list[Any]):
        from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if system_prompt:
            messages = [{"role": "system", "content": system_prompt}, *messages]
        built: list[Any] = []
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if not isinstance(content, str):
                raise TokenizerError(f"message content must be text, got {type(content).__name__}")
            thinking = self.style == "think_tokens" and THINK in content
            if role == "system":
                built.append(SystemMessage(content=_chunks(content) if thinking else content))
            elif role == "user":
                built.append(UserMessage(content=content))
            elif role == "assistant":
                built.append(AssistantMessage(content=_chunks(content) if thinking else content))
            else:
                raise TokenizerError(f"message role {role!r}: expected system, user or assistant")
        if not built or built[-1].role != "user":
            raise TokenizerError("the last message must be the user's")
        if images:
            text = built[-1].content
            built[-1] = UserMessage(content=[*(ImageChunk(image=image) for image in images), TextChunk(text=text)])
        try:
            return self.mistral.encode_chat_completion(ChatCompletionRequest(messages=built))
        except Exception as e:
            raise TokenizerError(f"cannot encode the chat ({type(e).__name__}: {e})") from None

    def encode_completion(self, text: str, eos: bool = True) -> list[int]:
        """Ids of an assistant completion written as text: `[THINK]`/`[/THINK]` become the control
        tokens (think-token style), everything else is plain text; the EOS closes it."""
        ids: list[int] = []
        parts = re.split(r"(\[THINK\]|\[/THINK\])", text) if self.style == "think_tokens" else [text]
        for part in parts:
            if part == THINK:
                ids.append(self.think_id)
            elif part == END_THINK:
                ids.append(self.end_think_id)
            elif part:
                ids += self.raw.encode(part, False, False)
        return [*ids, self.eos_id] if eos else ids

    def decode(self, ids: list[int], keep_special: bool = False) -> str:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        policy = SpecialTokenPolicy.KEEP if keep_special else SpecialTokenPolicy.IGNORE
        return self.raw.decode([int(i) for i in ids], special_token_policy=policy)

    def split(self, ids: list[int], strip: bool = True) -> Reasoning:
        """Splits completion ids (after the prompt; a trailing EOS is dropped) into thinking and
        answer; `strip=False` keeps surrounding whitespace (for streaming)."""
        ids = [int(i) for i in ids]
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        if self.style == "think_tags":
            return split_text(self.decode(ids), "think_tags", strip)
        tidy = str.strip if strip else str
        if self.think_id not in ids:
            return Reasoning(None, tidy(self.decode(ids)))
        start = ids.index(self.think_id) + 1
        if self.end_think_id not in ids[start:]:
            return Reasoning(tidy(self.decode(ids[start:])), "", closed=False)
        end = ids.index(self.end_think_id, start)
        return Reasoning(tidy(self.decode(ids[start:end])), tidy(self.decode(ids[end + 1 :])))


TOKENIZER_FILES = (
    "tekken.json",
    "tokenizer.model.v13",
    "tokenizer.model.v11",
    "tokenizer.model.v7",
    "tokenizer.model.v3",
    "tokenizer.model",
)


def find_tokenizer(checkpoint_dir: str) -> str:
    """The tokenizer file a checkpoint directory carries."""
    for fname in TOKENIZER_FILES:
        path = os.path.join(checkpoint_dir, fname)
        if os.path.exists(path):
            return path
    raise TokenizerError(f"{checkpoint_dir}: no tokenizer file ({', '.join(TOKENIZER_FILES)}); pass --tokenizer FILE")


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer from its file, or from the checkpoint directory that carries it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = find_tokenizer(path)
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: no such tokenizer file")
    return Tokenizer(path)


def resolve_system_prompt(
    choice: str,
    tokenizer: Tokenizer | SubsetTokenizer,
    purpose: Literal["chat", "training"],
    *,
    checkpoint: str | None = None,
    setting: str = "system_prompt",
) -> str | None:
    """The system prompt `choice` names: `none` (no system prompt), a text file, or `default`,
    which depends on the purpose:
    - `chat` (what `generate` and `eval` say to a checkpoint): the `SYSTEM_PROMPT.txt` that
      `checkpoint` ships where it has one (a training run's is the prompt it trained with), else the
      model family's card prompt (`tokenizer.default_system_prompt()`);
    - `training` (the prompts of training data): the tokenizer's training prompt
      (`tokenizer.training_system_prompt()`), which teaches the format the rewards grade.
    `setting` names the option or field `choice` comes from, in the error for a missing file."""
    if choice == "none":
        return None
    if choice == "default":
        if purpose == "training":
            return tokenizer.training_system_prompt()
        shipped = os.path.join(checkpoint, "SYSTEM_PROMPT.txt") if checkpoint is not None else None
        if shipped is None or not os.path.exists(shipped):
            return tokenizer.default_system_prompt()
        choice = shipped
    elif not os.path.exists(choice):
        raise ValueError(f"{setting}: {choice!r} is neither default, none nor an existing file")
    with open(choice) as f:
        return f.read()


def write_standin_tekken(path: str | os.PathLike[str], vocab_size: int = 131072) -> str:
    """Writes a Tekken v13 tokenizer built from the vocabulary inside the mistral-common wheel, with
    Magistral's control tokens (`[THINK]` 34, `[/THINK]` 35) and image settings; returns its path.

    `vocab_size` below Magistral's 131,072 keeps the 1,000 control tokens and the first merges (the
    256 bytes included, so any text still encodes), for tiny test models.

    A stand-in for tests and demos (recipe: reference/architecture-and-checkpoints.md, section 9).
    It reproduces the documented Magistral 2507 id sequences, but whether its BPE table equals
    Magistral's for every rank is unconfirmed: use the checkpoint's own `tekken.json` for real work.
    The file name must contain `tekken` and end in `.json` for mistral-common to recognise it.
    """
    import mistral_common
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    path = os.fspath(path)
    if "tekken" not in os.path.basename(path) or not path.endswith(".json"):
        raise TokenizerError(f"{path}: a Tekken file name must contain 'tekken' and end in '.json'")
    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tekken_240718.json")
    with open(src) as f:
        d = json.load(f)
    d["config"]["version"] = "v13"
    if not 1256 <= vocab_size <= 131072:
        raise TokenizerError(f"vocab_size {vocab_size}: 1256 (control tokens and bytes) to 131072 expected")
    d["config"]["default_vocab_size"] = vocab_size
    named = {
        t["rank"]: str(getattr(t["token_str"], "value", t["token_str"])) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS
    }
    named.update({32: "[ARGS]", 33: "[CALL_ID]", 34: THINK, 35: END_THINK})
    d["special_tokens"] = [
        {"rank": r, "token_str": named.get(r, f"<SPECIAL_{r}>"), "is_control": True} for r in range(1000)
    ]
    d["image"] = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
    with open(path, "w") as f:
        json.dump(d, f)
    return path


class SubsetTokenizer:
    """A tokenizer restricted to the ids a corpus uses, renumbered from 0 (for demo-size models).

    Encodes with `base`, then maps each id to its rank among the kept ids; decodes the other way.
    The control tokens of the chat format are always kept. An id outside the subset is an error.
    """

    def __init__(self, base: Tokenizer, ids: list[int]):
        always = [base.bos_id, base.eos_id, 3, 4, 17, 18]
        if base.think_id is not None:
            always += [base.think_id, base.end_think_id]
        self.base = base
        self.to_base = sorted(set(ids) | set(always))
        self.to_small = {i: k for k, i in enumerate(self.to_base)}
        self.style = base.style
        self.think_id = self.to_small.get(base.think_id) if base.think_id is not None else None
        self.end_think_id = self.to_small.get(base.end_think_id) if base.end_think_id is not None else None

    def _small(self, ids: list[int]) -> list[int]:
        try:
            return [self.to_small[i] for i in ids]
        except KeyError as e:
            raise TokenizerError(f"token id {e.args[0]} is outside this subset of {len(self.to_base)} ids") from None

    @property
    def bos_id(self) -> int:
        return self.to_small[self.base.bos_id]

    @property
    def eos_id(self) -> int:
        return self.to_small[self.base.eos_id]

    @property
    def vocab_size(self) -> int:
        return len(self.to_base)

    def default_system_prompt(self) -> str:
        return self.base.default_system_prompt()

    def training_system_prompt(self) -> str:
        return self.base.training_system_prompt()

    def encode_chat(self, messages: list[dict[str, str]] | str, system_prompt: str | None = None) -> list[int]:
        return self._small(self.base.encode_chat(messages, system_prompt))

    def encode_completion(self, text: str, eos: bool = True) -> list[int]:
        return self._small(self.base.encode_completion(text, eos))

    def decode(self, ids: list[int], keep_special: bool = False) -> str:
        return self.base.decode([self.to_base[int(i)] for i in ids], keep_special)

    def split(self, ids: list[int], strip: bool = True) -> Reasoning:
        return self.base.split([self.to_base[int(i)] for i in ids], strip)
