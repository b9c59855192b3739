"""The training recipes in configs/: they load, and the Magistral Small ones hold the paper's values
(reference/magistral-rl-recipe.md, section 3)."""

import glob
import os

import pytest

from magistral_jax.config import flatten_model_fields, get_preset
from magistral_jax.data.sources import make_source
from magistral_jax.rl.rewards import get_reward
from magistral_jax.tokenizer import load_tokenizer, write_standin_tekken
from magistral_jax.train.config import load_run_config

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs")


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_every_recipe_loads(kind):
    paths = [p for p in glob.glob(os.path.join(CONFIGS, f"{kind}-*.yaml"))]
    assert len(paths) >= 2
    for path in paths:
        assert load_run_config(path, kind=kind).kind == kind


def test_magistral_small_grpo_recipe_has_the_papers_values():
    cfg = load_run_config(os.path.join(CONFIGS, "grpo-magistral-small.yaml"))
    g, r = cfg.grpo, cfg.reward
    assert g.loss == "magistral" and g.kl_coef == 0.0
    assert g.eps_high == 0.3 and g.temperature == 1.0
    assert g.group_size * g.prompts_per_step == 2048 and g.minibatches == 1
    assert g.filter_metric == "correct"
    # Generation on its own chips, as the paper's asynchronous generators; a microbatch row per trainer chip.
    a = cfg.async_rl
    assert a.enabled and cfg.microbatch_tokens == 32 * (a.max_prompt_len + g.max_new_tokens)
    assert r["name"] == "magistral" and r["l_max"] - r["l_cache"] == 32 * 1024
    get_reward(r["name"])
    assert cfg.init_from == load_run_config(os.path.join(CONFIGS, "sft-magistral-small.yaml")).run_dir


@pytest.mark.parametrize("name", ["sft-magistral-small.yaml", "grpo-magistral-small.yaml"])
def test_magistral_small_recipes_build_their_model_config_and_data(name, tmp_path):
    cfg = load_run_config(os.path.join(CONFIGS, name))
    model = get_preset("magistral-small-2509").replace(**flatten_model_fields(cfg.model_overrides))
    assert (model.dtype, model.remat, model.attention) == ("bfloat16", "full", "splash")
    tokenizer = load_tokenizer(write_standin_tekken(tmp_path / "tekken.json"))
    examples = make_source(cfg.data, cfg.seed, tokenizer).next(4)
    assert all(e.prompt[:2] == [tokenizer.bos_id, 17] for e in examples)  # [SYSTEM_PROMPT] first
    assert all((e.answer is not None) == (cfg.kind == "sft") for e in examples)
