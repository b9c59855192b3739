"""Tokenizers and the chat format against the documented Magistral id sequences."""

import os

import mistral_common
import pytest

from magistral_jax.tokenizer import (
    SYSTEM_PROMPTS,
    Reasoning,
    TokenizerError,
    load_tokenizer,
    resolve_system_prompt,
    split_text,
    write_standin_tekken,
)


@pytest.fixture(scope="module")
def tekken(tmp_path_factory):
    return load_tokenizer(write_standin_tekken(tmp_path_factory.mktemp("tok") / "tekken.json"))


@pytest.fixture(scope="module")
def sentencepiece():
    data = os.path.join(os.path.dirname(mistral_common.__file__), "data")
    return load_tokenizer(os.path.join(data, "mistral_instruct_tokenizer_241114.model.v7"))


def test_documented_v13_sequences(tekken):
    # reference/architecture-and-checkpoints.md, sections 5 and 9 (Magistral-Small-2507's tokenizer).
    assert tekken.style == "think_tokens" and (tekken.think_id, tekken.end_think_id) == (34, 35)
    assert (tekken.bos_id, tekken.eos_id, tekken.vocab_size) == (1, 2, 131072)
    assert tekken.encode_chat("Hello, how are you?") == [1, 3, 22177, 1044, 2606, 1584, 1636, 1063, 4]
    messages = [{"role": "system", "content": "A[THINK]B[/THINK]C"}, {"role": "user", "content": "Hi"}]
    assert tekken.encode_chat(messages) == [1, 17, 1065, 34, 1066, 35, 1067, 18, 3, 37133, 4]


def test_default_system_prompt_of_2509(tekken):
    prompt = tekken.default_system_prompt()
    assert prompt == SYSTEM_PROMPTS["magistral-small-2509"] and len(prompt.encode()) == 554
    ids = tekken.encode_chat("How many 'r' are there in strawberry ?", system_prompt=prompt)
    assert len(ids) == 127
    assert ids[:3] == [1, 17, 10107] and ids[-3:] == [33681, 3082, 4]
    # [THINK]/[/THINK] in the system prompt are the control tokens, once each.
    assert ids.count(34) == 1 and ids.count(35) == 1 and ids.index(34) < ids.index(35) < ids.index(18)


def test_think_tags_style_with_a_sentencepiece_tokenizer(sentencepiece):
    assert sentencepiece.style == "think_tags" and sentencepiece.think_id is None
    ids = sentencepiece.encode_chat("Solve 1+1.", system_prompt=sentencepiece.default_system_prompt())
    text = sentencepiece.decode(ids, keep_special=True)
    assert text.startswith("<s>[SYSTEM_PROMPT]") and "<think>" in text and text.endswith("[/INST]")
    assert sentencepiece.default_system_prompt() == SYSTEM_PROMPTS["magistral-small-2506"]


def test_the_default_system_prompt_depends_on_its_purpose(sentencepiece, tmp_path):
    # A <think>-style tokenizer: chat defaults to the 2506 card's prompt, which forbids \boxed{}; training
    # data to the paper's RL prompt, which the math reward needs. A checkpoint's own SYSTEM_PROMPT.txt
    # is what it is chatted with, never what a training run puts in its data.
    shipped = "Answer in one word.\n"
    (tmp_path / "SYSTEM_PROMPT.txt").write_text(shipped)
    bare = tmp_path / "bare"
    bare.mkdir()
    chat = resolve_system_prompt("default", sentencepiece, "chat", checkpoint=str(bare))
    assert chat == SYSTEM_PROMPTS["magistral-small-2506"] and "NEVER use \\boxed{}" in chat
    assert resolve_system_prompt("default", sentencepiece, "chat", checkpoint=str(tmp_path)) == shipped
    for checkpoint in (None, str(tmp_path)):
        training = resolve_system_prompt("default", sentencepiece, "training", checkpoint=checkpoint)
        assert training == SYSTEM_PROMPTS["magistral-rl"] and "\\boxed" not in training
    for purpose in ("chat", "training"):
        assert resolve_system_prompt("none", sentencepiece, purpose, checkpoint=str(tmp_path)) is None
        assert resolve_system_prompt(str(tmp_path / "SYSTEM_PROMPT.txt"), sentencepiece, purpose) == shipped
    with pytest.raises(ValueError, match=r"data\.system_prompt: 'nosuch\.txt' is neither default, none nor"):
        resolve_system_prompt("nosuch.txt", sentencepiece, "training", setting="data.system_prompt")


def test_split_think_tokens(tekken):
    thinking, answer = tekken.raw.encode("Let me count.", False, False), tekken.raw.encode("Three.", False, False)
    assert tekken.split([34, *thinking, 35, *answer, 2]) == Reasoning("Let me count.", "Three.")
    assert tekken.split([34, *thinking]) == Reasoning("Let me count.", "", closed=False)
    assert tekken.split([*answer, 2]) == Reasoning(None, "Three.")
    # The documented detokenisation example around the thinking block: [..., 1046, 34, ... 35, 19587, ...].
    r = tekken.split([12598, 1046, 34, 6958, 35, 19587, 1051, 19587, 2])
    assert r.closed and r.thinking is not None and r.answer


def test_split_text_for_both_styles():
    assert split_text("<think>\nabc\n</think>\n\nThe answer.", "think_tags") == Reasoning("abc", "The answer.")
    assert split_text("<think> still going", "think_tags") == Reasoning("still going", "", closed=False)
    assert split_text("[THINK]x[/THINK]y", "think_tokens") == Reasoning("x", "y")
    assert split_text("no block", "think_tokens") == Reasoning(None, "no block")
    assert split_text("[THINK] a [/THINK] b ", "think_tokens", strip=False) == Reasoning(" a ", " b ")


def test_bad_input(tekken, tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match=r"no tokenizer file .* pass --tokenizer FILE"):
        load_tokenizer(tmp_path)
    (tmp_path / "tekken.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="role 'tool'"):
        tekken.encode_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(TokenizerError, match="the last message must be the user's"):
        tekken.encode_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(TokenizerError, match="must contain 'tekken'"):
        write_standin_tekken(tmp_path / "vocab.json")
