"""Published checkpoint layouts: tensor names, and the transforms between tensors and parameters.

A layout is a naming scheme. Every parameter of the model (see `magistral_jax.model.param_specs`)
has one row in the tables below: its path in the parameter tree, its name in the Hugging Face
layouts (relative to the layout's prefix for that part of the model), its name in Mistral's
`consolidated.safetensors`, and the kind of transform between the published tensor (PyTorch
layout) and the canonical parameter (one layer's slice for stacked parameters):

- `copy`: same shape (embeddings, norms);
- `linear`: a Linear weight `[out, in]` is the canonical `[in..., out...]` transposed, with the
  flat `in` / `out` dims split (`q_proj [N*K, D]` <-> `wq [D, N, K]`);
- `conv`: the patch convolution `[H, C, P, P]` <-> `[P, P, C, H]`;
- `q`/`k` (text) and `vq`/`vk` (vision): `linear`, plus in Mistral's layout the RoPE permutation:
  Mistral rotates interleaved pairs `(2i, 2i+1)` of each head, the canonical (Hugging Face) layout
  pairs `(i, i + K/2)`; inside every head, Mistral's even rows are the canonical first half and
  its odd rows the second half.

Transforms work on pieces, so that nothing ever needs a whole tensor in memory:
`read_canonical(tensor, index)` reads exactly the published slice a canonical index needs, and
`rows_index` / `to_torch_rows` produce a contiguous range of published rows from the canonical
block that holds them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from magistral_jax.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, malformed or inconsistent with the config."""


class NonFiniteWarning(UserWarning):
    """Tensors of a checkpoint hold NaN or Inf values (the message names them)."""


class SliceReader(Protocol):
    """A published tensor that can be read in slices (a safetensors slice object)."""

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray: ...


Index = tuple[slice, ...]


def _full(shape: Sequence[int]) -> Index:
    return tuple(slice(0, n) for n in shape)


def _bounds(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError("strided slices are not supported")
    return start, stop


@dataclass(frozen=True)
class Transform:
    """Published tensor <-> canonical parameter slice (see the module docstring)."""

    kind: str  # "copy", "linear" or "conv"
    n_in: int = 1  # linear: how many leading canonical dims are the Linear's input
    rope_heads: bool = False  # linear: output rows are Mistral-interleaved RoPE pairs per head

    def torch_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(shape)
        if self.kind == "copy":
            return shape
        if self.kind == "conv":
            p, q, c, h = shape
            return (h, c, p, q)
        return (math.prod(shape[self.n_in :]), math.prod(shape[: self.n_in]))

    def row_unit(self, shape: Sequence[int]) -> int:
        """Published rows come in indivisible groups of this size (one head for q/k/v/o)."""
        if self.kind == "linear":
            return math.prod(tuple(shape)[self.n_in + 1 :])
        return 1

    def read_canonical(self, tensor: SliceReader, shape: Sequence[int], index: Index) -> np.ndarray:
        """The canonical block `index` of a parameter slice of `shape`, read from `tensor`."""
        shape = tuple(shape)
        index = tuple(slice(*_bounds(s, n)) for s, n in zip(index, shape, strict=True))
        if self.kind == "copy":
            return tensor[index]
        if self.kind == "conv":
            return np.transpose(tensor[(index[3], index[2], index[0], index[1])], (2, 3, 1, 0))
        in_dims, out_dims = shape[: self.n_in], shape[self.n_in :]
        in_idx, out_idx = index[: self.n_in], index[self.n_in :]
        # Read whole inner groups (rows of complete heads, columns of complete inner dims) and
        # cut the inner dims afterwards; with the sharding rules the inner dims are never split.
        rows, out_sub = _covering(out_idx, out_dims)
        cols, in_sub = _covering(in_idx, in_dims)
        block = tensor[(rows, cols)]
        if self.rope_heads:
            k = out_dims[-1]
            block = block.reshape(-1, k // 2, 2, block.shape[1]).transpose(0, 2, 1, 3).reshape(block.shape)
        block = block.T.reshape(in_sub + out_sub)
        inner = (slice(None), *_inner(in_idx, in_dims), slice(None), *_inner(out_idx, out_dims))
        return block[inner]

    def rows_index(self, shape: Sequence[int], start: int, stop: int) -> Index:
        """The canonical index holding published rows [start, stop) (multiples of `row_unit`)."""
        shape = tuple(shape)
        if self.kind == "copy":
            return (slice(start, stop), *_full(shape[1:]))
        if self.kind == "conv":
            return (*_full(shape[:3]), slice(start, stop))
        unit = self.row_unit(shape)
        if start % unit or stop % unit:
            raise ValueError(f"rows [{start}, {stop}) are not aligned to groups of {unit}")
        out_first = slice(start // unit, stop // unit)
        return (*_full(shape[: self.n_in]), out_first, *_full(shape[self.n_in + 1 :]))

    def to_torch_rows(self, block: np.ndarray) -> np.ndarray:
        """Published rows from the canonical block given by `rows_index`."""
        if self.kind == "copy":
            return block
        if self.kind == "conv":
            return np.transpose(block, (3, 2, 0, 1))
        n_cols = math.prod(block.shape[: self.n_in])
        rows = block.reshape(n_cols, -1).T
        if self.rope_heads:
            k = block.shape[-1]
            rows = rows.reshape(-1, 2, k // 2, n_cols).transpose(0, 2, 1, 3).reshape(rows.shape)
        return np.ascontiguousarray(rows)


def _covering(idx: Index, dims: Sequence[int]) -> tuple[slice, tuple[int, ...]]:
    """Flat range covering `idx` with whole inner groups, and the block's unflattened shape."""
    inner = math.prod(dims[1:])
    start, stop = _bounds(idx[0], dims[0])
    return slice(start * inner, stop * inner), (stop - start, *dims[1:])


def _inner(idx: Index, dims: Sequence[int]) -> list[slice]:
    return [slice(*_bounds(s, n)) for s, n in zip(idx[1:], dims[1:], strict=True)]


COPY = Transform("copy")
LINEAR = Transform("linear")
CONV = Transform("conv")

# (parameter path, HF name relative to the part's prefix, Mistral name relative to its prefix,
#  transform key); "{i}" = layer index. Transform keys other than copy/linear/conv are resolved
# per layout by `_transform`.
TEXT_TABLE: tuple[tuple[tuple[str, ...], str, str, str], ...] = (
    (("embed",), "embed_tokens.weight", "tok_embeddings.weight", "copy"),
    (("layers", "attention_norm"), "layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight", "copy"),
    (("layers", "wq"), "layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight", "rope"),
    (("layers", "wk"), "layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight", "rope"),
    (("layers", "wv"), "layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight", "linear"),
    (("layers", "wo"), "layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight", "out"),
    (("layers", "ffn_norm"), "layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight", "copy"),
    (("layers", "w1"), "layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight", "linear"),
    (("layers", "w3"), "layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight", "linear"),
    (("layers", "w2"), "layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight", "linear"),
    (("norm",), "norm.weight", "norm.weight", "copy"),
    (("lm_head",), "{lm_head}", "output.weight", "linear"),
)

_VL = "transformer.layers.{i}."
VISION_TABLE: tuple[tuple[tuple[str, ...], str, str, str], ...] = (
    (("vision", "patch_conv"), "patch_conv.weight", "patch_conv.weight", "conv"),
    (("vision", "ln_pre"), "ln_pre.weight", "ln_pre.weight", "copy"),
    (("vision", "layers", "attention_norm"), _VL + "attention_norm.weight", _VL + "attention_norm.weight", "copy"),
    (("vision", "layers", "wq"), _VL + "attention.q_proj.weight", _VL + "attention.wq.weight", "rope"),
    (("vision", "layers", "wk"), _VL + "attention.k_proj.weight", _VL + "attention.wk.weight", "rope"),
    (("vision", "layers", "wv"), _VL + "attention.v_proj.weight", _VL + "attention.wv.weight", "linear"),
    (("vision", "layers", "wo"), _VL + "attention.o_proj.weight", _VL + "attention.wo.weight", "out"),
    (("vision", "layers", "ffn_norm"), _VL + "ffn_norm.weight", _VL + "ffn_norm.weight", "copy"),
    (("vision", "layers", "w1"), _VL + "feed_forward.gate_proj.weight", _VL + "feed_forward.w1.weight", "linear"),
    (("vision", "layers", "w3"), _VL + "feed_forward.up_proj.weight", _VL + "feed_forward.w3.weight", "linear"),
    (("vision", "layers", "w2"), _VL + "feed_forward.down_proj.weight", _VL + "feed_forward.w2.weight", "linear"),
)

PROJECTOR_TABLE: tuple[tuple[tuple[str, ...], str, str, str], ...] = (
    (("projector", "norm"), "norm.weight", "pre_mm_projector_norm.weight", "copy"),
    (("projector", "merge"), "patch_merger.merging_layer.weight", "patch_merger.merging_layer.weight", "linear"),
    (("projector", "w_in"), "linear_1.weight", "vision_language_adapter.w_in.weight", "linear"),
    (("projector", "w_out"), "linear_2.weight", "vision_language_adapter.w_out.weight", "linear"),
)


@dataclass(frozen=True)
class Layout:
    """One naming scheme: the prefix of each part of the model and which name column applies."""

    name: str
    text_prefix: str
    lm_head: str
    vision_prefix: str | None
    projector_prefix: str | None
    mistral: bool = False
    description: str = ""


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "hf-legacy",
            "language_model.model.",
            "language_model.lm_head.weight",
            "vision_tower.",
            "multi_modal_projector.",
            description="Mistral3ForConditionalGeneration as transformers writes it to disk",
        ),
        Layout(
            "hf-new",
            "model.language_model.",
            "lm_head.weight",
            "model.vision_tower.",
            "model.multi_modal_projector.",
            description="Mistral3ForConditionalGeneration as its module tree names it",
        ),
        Layout("hf-text", "model.", "lm_head.weight", None, None, description="MistralForCausalLM"),
        Layout(
            "mistral",
            "",
            "output.weight",
            "vision_encoder.",
            "",
            mistral=True,
            description="Mistral consolidated.safetensors",
        ),
    )
}


@dataclass(frozen=True)
class TensorEntry:
    """One published tensor: its name, where it lives in the parameter tree, and how it maps."""

    name: str
    path: tuple[str, ...]
    layer: int | None  # index along the stacked `layers` axis, or None
    shape: tuple[int, ...]  # canonical shape of this tensor's parameter slice
    transform: Transform

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return self.transform.torch_shape(self.shape)


def _transform(key: str, mistral: bool) -> Transform:
    return {
        "copy": COPY,
        "conv": CONV,
        "linear": LINEAR,
        "out": Transform("linear", n_in=2),
        "rope": Transform("linear", rope_heads=mistral),
    }[key]


def plan(cfg: ModelConfig, layout: Layout) -> list[TensorEntry]:
    """Every published tensor of `cfg` in `layout`, in a stable order (text, vision, projector)."""
    from magistral_jax.model import param_specs

    specs = param_specs(cfg)
    parts = [(TEXT_TABLE, layout.text_prefix, cfg.text.n_layers)]
    if cfg.vision is not None:
        if layout.vision_prefix is None:
            raise CheckpointError(f"the {layout.name} layout ({layout.description}) has no vision weights")
        parts.append((VISION_TABLE, layout.vision_prefix, cfg.vision.n_layers))
        parts.append((PROJECTOR_TABLE, layout.projector_prefix or "", 0))
    entries = []
    for table, prefix, n_layers in parts:
        for path, hf_name, mistral_name, key in table:
            spec: Any = specs
            for part in path:
                spec = spec[part]
            template = mistral_name if layout.mistral else hf_name
            transform = _transform(key, layout.mistral)
            layered = "layers" in path
            for i in range(n_layers) if layered else [None]:
                name = layout.lm_head if template == "{lm_head}" else prefix + template.format(i=i)
                shape = spec.shape[1:] if layered else spec.shape
                entries.append(TensorEntry(name, path, i, tuple(shape), transform))
    return entries


def detect_layout(names: set[str]) -> Layout:
    """The layout whose decoder embedding is among `names`."""
    for layout in LAYOUTS.values():
        key = layout.text_prefix + ("tok_embeddings.weight" if layout.mistral else "embed_tokens.weight")
        if key in names:
            return layout
    sample = ", ".join(sorted(names)[:5])
    raise CheckpointError(
        "no decoder embedding found (expected one of language_model.model.embed_tokens.weight, "
        "model.language_model.embed_tokens.weight, model.embed_tokens.weight, tok_embeddings.weight); "
        f"the checkpoint has: {sample}, ..."
    )
