"""Reading Hugging Face safetensors checkpoints into the canonical parameter tree.

A layout is a prefix table: the decoder tensors are named the same in every HF layout once the
prefix is removed; only the prefix and the output head's name differ. Each canonical parameter
has one entry in `TEXT_TENSORS`: its path in the parameter tree, its name relative to the prefix
(`{i}` = layer), and a transform from the PyTorch tensor to the canonical array:

- `copy`: same shape (embeddings, norms);
- `linear`: a PyTorch Linear weight `[out, in]` transposed to `[in, out]` and reshaped to the
  canonical shape (`q_proj [N*K, D]` -> `wq [D, N, K]`).

HF q/k projections are stored in the "rotate_half" RoPE layout, which is the canonical one, so no
permutation is needed here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open
from tqdm.auto import tqdm

from magistral_jax.config import ModelConfig
from magistral_jax.model import params as P
from magistral_jax.model.decoder import param_specs
from magistral_jax.sharding import logical_sharding


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, malformed or inconsistent with the config."""


@dataclass(frozen=True)
class Layout:
    """Where the decoder tensors live in one HF naming scheme."""

    name: str
    text_prefix: str
    lm_head: str
    # Tensors under these prefixes belong to parts this reader does not load (vision tower and
    # projector of Mistral3 checkpoints).
    other_prefixes: tuple[str, ...] = ()


LAYOUTS: tuple[Layout, ...] = (
    # Mistral3ForConditionalGeneration as saved by transformers <= 4.51 and 5.x on disk.
    Layout(
        "hf-legacy",
        "language_model.model.",
        "language_model.lm_head.weight",
        ("vision_tower.", "multi_modal_projector."),
    ),
    # The module tree of current transformers VLMs.
    Layout(
        "hf-new", "model.language_model.", "lm_head.weight", ("model.vision_tower.", "model.multi_modal_projector.")
    ),
    # MistralForCausalLM.
    Layout("hf-text", "model.", "lm_head.weight"),
)

# (parameter path, name relative to the layout's text prefix, transform); "{head}" = lm_head name.
TEXT_TENSORS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("embed",), "embed_tokens.weight", "copy"),
    (("layers", "attention_norm"), "layers.{i}.input_layernorm.weight", "copy"),
    (("layers", "wq"), "layers.{i}.self_attn.q_proj.weight", "linear"),
    (("layers", "wk"), "layers.{i}.self_attn.k_proj.weight", "linear"),
    (("layers", "wv"), "layers.{i}.self_attn.v_proj.weight", "linear"),
    (("layers", "wo"), "layers.{i}.self_attn.o_proj.weight", "linear"),
    (("layers", "ffn_norm"), "layers.{i}.post_attention_layernorm.weight", "copy"),
    (("layers", "w1"), "layers.{i}.mlp.gate_proj.weight", "linear"),
    (("layers", "w3"), "layers.{i}.mlp.up_proj.weight", "linear"),
    (("layers", "w2"), "layers.{i}.mlp.down_proj.weight", "linear"),
    (("norm",), "norm.weight", "copy"),
    (("lm_head",), "{head}", "linear"),
)

# How many leading canonical dims (after `layers`) are the Linear's input dims.
_LINEAR_INPUT_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w1": 1, "w3": 1, "w2": 1, "lm_head": 1}


def torch_shape(key: str, transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a tensor whose canonical (per-layer) shape is `shape`."""
    if transform == "copy":
        return shape
    n_in = _LINEAR_INPUT_DIMS[key]
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def to_canonical(array: np.ndarray, transform: str, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch tensor -> canonical array of `shape`."""
    if transform == "copy":
        return array.reshape(shape)
    return np.ascontiguousarray(array.T).reshape(shape)


class SafetensorsDir:
    """The tensors of a directory of safetensors files, by name, read lazily."""

    def __init__(self, path: str):
        self.path = path
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index_path):
            with open(index_path) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no .safetensors files")
            weight_map = None
        self._handles = {}
        self.file_of: dict[str, str] = {}
        for fname in files:
            fpath = os.path.join(path, fname)
            if not os.path.exists(fpath):
                raise CheckpointError(f"{fname}: listed in model.safetensors.index.json but missing from {path}")
            try:
                handle = safe_open(fpath, framework="numpy")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{fname}: cannot read the safetensors header ({e})") from None
            self._handles[fname] = handle
            for name in handle.keys():
                self.file_of[name] = fname
        if weight_map is not None:
            for name, fname in weight_map.items():
                if self.file_of.get(name) != fname:
                    raise CheckpointError(f"{name}: listed in the index under {fname} but not found there")

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        if name not in self.file_of:
            raise CheckpointError(f"{name}: missing from the checkpoint in {self.path}")
        return self._handles[self.file_of[name]].get_tensor(name)


def detect_layout(names: set[str]) -> Layout:
    """The layout whose embedding tensor is present."""
    for layout in LAYOUTS:
        if f"{layout.text_prefix}embed_tokens.weight" in names:
            return layout
    sample = ", ".join(sorted(names)[:5])
    raise CheckpointError(
        "no decoder embedding found (expected one of "
        + ", ".join(f"{layout.text_prefix}embed_tokens.weight" for layout in LAYOUTS)
        + f"); the checkpoint has: {sample}, ..."
    )


def _tensor_names(layout: Layout, rel: str, n_layers: int, layered: bool) -> list[str]:
    if rel == "{head}":
        return [layout.lm_head]
    if layered:
        return [layout.text_prefix + rel.format(i=i) for i in range(n_layers)]
    return [layout.text_prefix + rel]


def _iter_text_params(
    src: SafetensorsDir, layout: Layout, cfg: ModelConfig, dtype: np.dtype
) -> Iterator[tuple[tuple[str, ...], np.ndarray, int]]:
    """Yields (param path, canonical host array, bytes read) for each decoder parameter."""
    specs = param_specs(cfg.text)
    for path, rel, transform in TEXT_TENSORS:
        spec = specs
        for part in path:
            spec = spec[part]
        layered = path[0] == "layers"
        per_layer = spec.shape[1:] if layered else spec.shape
        expected = torch_shape(path[-1], transform, per_layer)
        arrays = []
        nbytes = 0
        for name in _tensor_names(layout, rel, cfg.text.n_layers, layered):
            if name not in src.file_of:
                raise CheckpointError(f"{name}: missing from the checkpoint in {src.path}")
            got = src.shape(name)
            if got != expected:
                raise CheckpointError(f"{name}: shape {expected} expected, {got} in {src.file_of[name]}")
            tensor = src.read(name)
            nbytes += tensor.nbytes
            arrays.append(to_canonical(tensor, transform, per_layer).astype(dtype))
        yield path, (np.stack(arrays) if layered else arrays[0]), nbytes


def load_text_params(path: str, cfg: ModelConfig, mesh: Mesh | None = None, progress: bool = True) -> P.ParamTree:
    """Reads the decoder parameters of an HF checkpoint directory into `cfg.param_dtype`.

    Parameters are placed one at a time in their shardings on `mesh` (on the default device
    without a mesh), so host memory holds one stacked parameter at a time.
    """
    src = SafetensorsDir(path)
    names = src.names()
    layout = detect_layout(names)
    expected = {
        n for p, rel, _ in TEXT_TENSORS for n in _tensor_names(layout, rel, cfg.text.n_layers, p[0] == "layers")
    }
    unexpected = sorted(n for n in names - expected if not any(n.startswith(p) for p in layout.other_prefixes))
    if unexpected:
        first = unexpected[0]
        raise CheckpointError(
            f"{first}: unexpected tensor in {src.file_of[first]} for a {cfg.text.n_layers}-layer "
            f"decoder in the {layout.name} layout ({len(unexpected)} unexpected in all)"
        )
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    specs = param_specs(cfg.text)
    out: dict = {"layers": {}}
    bar = tqdm(total=len(TEXT_TENSORS), desc="loading", unit="param", disable=not progress)
    read = 0
    for param_path, array, nbytes in _iter_text_params(src, layout, cfg, dtype):
        read += nbytes
        spec = specs
        for part in param_path:
            spec = spec[part]
        if mesh is None:
            value = jax.device_put(array)
        else:
            sharding = logical_sharding(mesh, spec.axes, cfg.rules, spec.shape)
            value = jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index])
        target = out
        for part in param_path[:-1]:
            target = target[part]
        target[param_path[-1]] = value
        bar.set_postfix_str(f"{read / 2**30:.2f} GiB read")
        bar.update()
    bar.close()
    return out
