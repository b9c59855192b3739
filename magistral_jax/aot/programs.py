"""The programs a training run compiles, built from abstract shapes: what `magistral-jax plan` lowers.

Thin on purpose: every program is the trainer's or the sampler's own public jitted function,
called with the static arguments the run uses, on `jax.ShapeDtypeStruct` arguments that carry the
shardings the run's arrays have (an argument the run makes with `jnp.asarray`, such as a prompt
length vector, is uncommitted, which a program on a mesh takes whole on every device):

- train (`train.step`): `microbatch_gradients` on one packed [rows, row_len] microbatch,
  `accumulate_gradients` (when a minibatch has several microbatches) and the `update_program`
  of the run's optimizer, parameters and optimizer state in their shardings;
- synchronous sampling (`sampling.sampler`): `prefill` of the step's prompts (`group_size`
  samples each) and `decode`, the whole loop, with the trainer's own parameters;
- asynchronous generation (`sampling.continuous`): `insert` of a full batch of requests into the
  batcher's slots and one `decode` chunk, on the generator devices.

A program's arguments may be another program's outputs (the gradients the update takes, the
decode state the prefill fills): `Program.inputs` receives the abstract outputs of the programs
before it, as the planner compiles them in order, so each program sees the shardings the one
before it produces, as in the run.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from magistral_jax.checkpoint.runs import architecture, is_run_dir
from magistral_jax.config import ConfigError, ModelConfig
from magistral_jax.model import param_specs
from magistral_jax.model import params as P
from magistral_jax.sampling.continuous import empty_state, insert, insert_rows
from magistral_jax.sampling.sampler import cache_shape, decode, prefill
from magistral_jax.sampling.strategies import SamplingParams
from magistral_jax.sharding import logical_sharding, make_mesh, parse_mesh
from magistral_jax.train import step as train_step
from magistral_jax.train.config import RunConfig
from magistral_jax.train.packing import FIELDS

Abstract = Any  # a pytree of jax.ShapeDtypeStruct


@dataclass
class Program:
    """One compiled program of a step.

    Attributes:
      name: what it is (`gradients`, `update`, `prefill`, ...).
      phase: `train` or `sample`: which part of the step runs it.
      fn: the jitted function (the trainer's or sampler's own).
      inputs: its abstract arguments, from the abstract outputs of the programs before it (by name).
      static: its static keyword arguments.
      mesh: the devices it runs on.
      executions: how many times a step runs it.
      resident: the other buffers alive on its devices while it runs (not its arguments: the
        optimizer state while the gradients are computed, say), abstract, from the abstract
        outputs of the programs before it and its own.
      loop_trips: `(metadata) -> trip count` for its data-dependent loops (see `hlo_costs`).
      note: what the plan should say about it.
    """

    name: str
    phase: str
    fn: Any
    inputs: Callable[[dict[str, Abstract]], tuple]
    static: dict[str, Any] = field(default_factory=dict)
    mesh: Mesh | None = None
    executions: float = 1.0
    resident: Callable[[dict[str, Abstract]], Abstract] = lambda outputs: ()
    loop_trips: Callable[[str], float | None] | None = None
    note: str = ""


def abstract_params(cfg: ModelConfig, mesh: Mesh) -> Abstract:
    """The parameters as `init_model` / `load_model` place them on `mesh`, abstract."""
    return P.abstract(param_specs(cfg), cfg.param_dtype, mesh, cfg.rules)


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(every parameter, the parameters of a token's matmuls: the text decoder without its input
    embedding table, which is a lookup)."""
    from magistral_jax.model import decoder

    text = P.count(decoder.param_specs(cfg.text))
    return P.count(param_specs(cfg)), text - cfg.text.vocab_size * cfg.text.dim


def _rows(mesh: Mesh, cfg: ModelConfig, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    """A batch as `Model.place_batch` puts it on the mesh: rows over the batch axes."""
    logical = ("batch", "act_seq")[: len(shape)]
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=logical_sharding(mesh, logical, cfg.rules, shape))


def _host(mesh: Mesh, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    """An array the run makes with `jnp.asarray` (uncommitted): a program on a mesh takes it whole
    on every device."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _key(mesh: Mesh) -> jax.ShapeDtypeStruct:
    k = jax.eval_shape(lambda: jax.random.key(0))
    return _host(mesh, k.shape, k.dtype)


def outputs_of(compiled: Any, fn: Any, args: tuple, static: dict[str, Any]) -> Abstract:
    """The abstract outputs of `fn(*args, **static)` in the shardings its `compiled` program gives them."""
    shapes = jax.eval_shape(functools.partial(fn, **static), *args)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, compiled.output_shardings
    )


def compile_program(program: Program, outputs: dict[str, Abstract]) -> tuple[Any, Abstract]:
    """Lowers and compiles `program` on its mesh, its arguments from the abstract `outputs` of the
    programs before it; returns the compiled program and its own abstract outputs."""
    args = program.inputs(outputs)
    with jax.set_mesh(program.mesh):
        compiled = program.fn.lower(*args, **program.static).compile()
        return compiled, outputs_of(compiled, program.fn, args, program.static)


def optimizer_state(tx: optax.GradientTransformation, params: Abstract) -> Abstract:
    """The optimizer state `Trainer` creates (`train.step.optimizer_init_program`), abstract."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(tx.init, params),
        train_step.optimizer_state_shardings(tx, params),
    )


# ------------------------------------------------------------------------------------------------
# Train programs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainShape:
    """What a train step runs: `updates` optimizer updates, each on `microbatches` microbatches of
    [rows, row_len] tokens."""

    rows: int
    row_len: int
    microbatches: int = 1
    updates: int = 1

    @property
    def tokens(self) -> int:
        return self.rows * self.row_len * self.microbatches * self.updates


def train_programs(
    cfg: ModelConfig,
    mesh: Mesh,
    objective: train_step.Objective,
    optimizer: train_step.OptimizerConfig,
    total_steps: int,
    chunk: int,
    shape: TrainShape,
) -> tuple[list[Program], Abstract, Abstract]:
    """The programs `Trainer.train_step` runs, and the abstract parameters and optimizer state."""
    tx, _ = train_step.shared_optimizer(optimizer, total_steps)
    params = abstract_params(cfg, mesh)
    state = optimizer_state(tx, params)
    mb_shape = (shape.rows, shape.row_len)
    mb = {n: _rows(mesh, cfg, mb_shape, jnp.int32) for n in ("tokens", "targets", "segment_ids", "positions")}
    mb |= {n: _rows(mesh, cfg, mb_shape, jnp.float32) for n in FIELDS}
    several = shape.microbatches > 1

    def grads_of(outputs):
        return outputs["accumulate"] if several else outputs["gradients"][1]

    programs = [
        Program(
            "gradients",
            "train",
            train_step.microbatch_gradients,
            lambda outputs: (params, mb),
            dict(cfg=cfg, objective=objective, chunk=chunk),
            mesh,
            shape.microbatches * shape.updates,
            # The optimizer state, and the gradients summed over the microbatches before.
            resident=lambda outputs: (state, outputs["gradients"][1]) if several else (state,),
        )
    ]
    if several:
        programs.append(
            Program(
                "accumulate",
                "train",
                train_step.accumulate_gradients,
                lambda outputs: (outputs["gradients"][1], outputs["gradients"][1]),
                {},
                mesh,
                (shape.microbatches - 1) * shape.updates,
                resident=lambda outputs: (params, state),
            )
        )
    update = train_step.update_program(
        tx, jax.tree.map(lambda x: x.sharding, params), jax.tree.map(lambda x: x.sharding, state)
    )
    programs.append(
        Program(
            "update",
            "train",
            update,
            lambda outputs: (params, state, grads_of(outputs), outputs["gradients"][0][0]),
            {},
            mesh,
            shape.updates,
        )
    )
    return programs, params, state


# ------------------------------------------------------------------------------------------------
# Sampling programs
# ------------------------------------------------------------------------------------------------


def _block_trips(blocks: int, outer: str | None = None) -> Callable[[str], float | None]:
    """Trip counts of the cached attention's loop over filled key blocks (data-dependent): `blocks`;
    the decode program's own loop (`outer`): once, the program being counted per decode step."""

    def trips(metadata: str) -> float | None:
        if "/attention/while" in metadata:
            return float(blocks)
        if outer is not None and f"{outer}/while" in metadata:
            return 1.0
        return None

    return trips


def sampler_programs(
    cfg: ModelConfig,
    mesh: Mesh,
    params: Abstract,
    prompts: int,
    prompt_len: int,
    max_new: int,
    n: int,
    sampling: SamplingParams,
    stop_ids: tuple[int, ...],
    resident: Abstract = (),
    executions: float = 1.0,
) -> list[Program]:
    """`Sampler.sample`'s programs for `prompts` prompts of `prompt_len` tokens, `n` samples each,
    `max_new` new tokens: the prefill, and the decode loop counted per decode step (its body run
    `max_new` times). The cached attention reads the filled key blocks only: the prompt's in the
    prefill, on average the prompt and half the new tokens in a decode step."""
    width, cache_len = cache_shape(prompt_len, max_new)
    block = cfg.attention_block
    prefill_blocks = math.ceil(prompt_len / block)
    mean_blocks = math.ceil((prompt_len + max_new / 2) / block)
    return [
        Program(
            "prefill",
            "sample",
            prefill,
            lambda outputs: (
                params,
                _rows(mesh, cfg, (prompts, width), jnp.int32),
                _host(mesh, (prompts,), jnp.int32),
                _key(mesh),
                None,
                _host(mesh, (prompts,), jnp.int32),
            ),
            dict(cfg=cfg, n=n, cache_len=cache_len, max_new=max_new),
            mesh,
            executions,
            resident=lambda outputs: resident,
            loop_trips=_block_trips(prefill_blocks),
            note=f"prefill: {prompts} prompts of {prompt_len} tokens (padded to {width}) into a cache of "
            f"{cache_len} slots, x {n} samples; attention over {prefill_blocks} key block(s) of {block}",
        ),
        Program(
            "decode",
            "sample",
            decode,
            lambda outputs: (params, outputs["prefill"], _host(mesh, (), jnp.int32)),
            dict(cfg=cfg, sampling=sampling, stop_ids=stop_ids),
            mesh,
            executions * max_new,
            resident=lambda outputs: resident,
            loop_trips=_block_trips(mean_blocks, outer="jit(decode)"),
            note=f"decode: one step of the decode loop, run once per new token ({max_new}) over "
            f"{prompts * n} rows; attention over {mean_blocks} key block(s) (the mean filled cache)",
        ),
    ]


def batcher_programs(
    cfg: ModelConfig,
    mesh: Mesh,
    params: Abstract,
    slots: int,
    prompt_len: int,
    max_new: int,
    chunk: int,
    sampling: SamplingParams,
    stop_ids: tuple[int, ...],
    completions: int,
) -> list[Program]:
    """`ContinuousBatcher`'s programs over `slots` slots: `insert` of a full batch of requests
    (the largest it compiles) and one `decode` chunk of `chunk` steps, counted per decode step;
    `completions` per step of `max_new` tokens at most set how often they run."""
    width, cache_len = cache_shape(prompt_len, max_new)
    rows = insert_rows(slots, slots)
    block = cfg.attention_block
    static = dict(cfg=cfg, slots=slots, cache_len=cache_len, max_new=max_new)
    with jax.set_mesh(mesh):
        state = outputs_of(empty_state.lower(**static).compile(), empty_state, (), static)
    decode_steps = completions * max_new / slots  # every slot busy with a full-length completion
    return [
        Program(
            "insert",
            "sample",
            insert,
            # slots, prompts, lengths, limits, seeds, version: host arrays made with jnp.asarray
            lambda outputs: (
                params,
                state,
                _host(mesh, (rows,), jnp.int32),
                _host(mesh, (rows, width), jnp.int32),
                *(_host(mesh, (rows,), jnp.int32) for _ in range(3)),
                _host(mesh, (), jnp.int32),
            ),
            dict(cfg=cfg),
            mesh,
            completions / rows,
            loop_trips=_block_trips(math.ceil(prompt_len / block)),
            note=f"insert: {rows} requests of {prompt_len} tokens into {slots} slots of {cache_len}",
        ),
        Program(
            "decode",
            "sample",
            decode,
            # The step limit is the state's step plus the chunk (an array where the state is).
            lambda outputs: (
                params,
                outputs["insert"],
                jax.ShapeDtypeStruct((), jnp.int32, sharding=outputs["insert"].step.sharding),
                _host(mesh, (), jnp.int32),
            ),
            dict(cfg=cfg, sampling=sampling, stop_ids=stop_ids),
            mesh,
            decode_steps,
            loop_trips=_block_trips(math.ceil((prompt_len + max_new / 2) / block), outer="jit(decode)"),
            note=f"decode: one step of a {chunk}-step chunk over {slots} slots, {decode_steps:.0f} steps per train "
            "step (every slot busy with a full-length completion)",
        ),
    ]


# ------------------------------------------------------------------------------------------------
# A run config's programs
# ------------------------------------------------------------------------------------------------


def run_model_config(run: RunConfig) -> tuple[ModelConfig, str]:
    """The model config a run trains, and where it was read from: `init_from`'s architecture when
    that checkpoint or run directory exists here (as `train` would load it), else the run's `model`
    (a preset or a YAML model config); the run's `model_overrides` and `param_dtype` on top."""
    source = run.init_from
    here = bool(source) and os.path.exists(source)
    cfg = architecture(source if here else None, run.model, run.model_overrides, run.param_dtype)
    if here:
        where = f"init_from {source}" + (" (a run directory)" if is_run_dir(source) else "")
    else:
        where = f"model: {run.model}" + (f" (init_from {source} is not here)" if source else "")
    return cfg, where


def _row_len(run: RunConfig, longest: int) -> int:
    # As the training loop sizes a step's rows: `row_len`, else the longest sequence up to 64.
    return run.row_len or max(64, math.ceil(longest / 64) * 64)


@dataclass
class RunPrograms:
    """A run's step: its programs and what the plan assumed about its shapes."""

    cfg: ModelConfig
    programs: list[Program]
    train: TrainShape
    train_devices: int
    sample_devices: int
    generated_tokens: int  # tokens the sampling programs generate per step
    processed_tokens: int  # tokens they run the model over (prompts and completions)
    overlapped: bool  # sampling runs beside training (asynchronous), not before it
    notes: list[str]
    decode_rows: int = 0  # rows of the decode program (0: no sampling)


def run_programs(
    run: RunConfig, devices: Sequence[Any], prompt_len: int | None = None, cfg: ModelConfig | None = None
) -> RunPrograms:
    """The programs one step of `run` compiles on `devices` (a TPU slice's compile-only devices, or
    this machine's), with the shapes `train` would give them.

    GRPO sequences are `prompt_len` prompt tokens (default `async_rl.max_prompt_len`, the prompts
    being data) plus `max_new_tokens`, packed into rows of `row_len` (default: that sum, rounded
    up to 64); the step's count of microbatches assumes every completion reaches its budget.
    SFT rows are `row_len` long (required: the examples' lengths are data).
    """
    if cfg is None:
        cfg, where = run_model_config(run)
    else:
        where = "given"
    notes = [f"model config from {where}"]
    g, a = run.grpo, run.async_rl
    if run.kind == "sft":
        if not run.row_len:
            raise ConfigError("row_len: plan needs the SFT rows' length (the longest example is data): set row_len")
        row_len = run.row_len
        sequences = run.sft.batch_size
        updates = 1
    else:
        prompt_len = prompt_len or a.max_prompt_len
        longest = prompt_len + g.max_new_tokens
        if longest > cfg.text.max_position_embeddings:
            raise ConfigError(
                f"grpo.max_new_tokens: prompts of {prompt_len} tokens plus {g.max_new_tokens} new tokens exceed the "
                f"model's context of {cfg.text.max_position_embeddings}"
            )
        row_len = _row_len(run, longest)
        if row_len < longest:
            raise ConfigError(f"row_len: {row_len} slots cannot hold a sequence of {longest} tokens")
        notes.append(
            f"sequences of {prompt_len} prompt tokens (assumed: async_rl.max_prompt_len or --prompt-len) + "
            f"{g.max_new_tokens} new tokens, rows of {row_len}"
        )
        sequences = g.prompts_per_step * g.group_size // g.minibatches
        updates = g.minibatches
    rows = max(1, run.microbatch_tokens // row_len)
    shape = TrainShape(rows, row_len, math.ceil(sequences / rows), updates)
    devices = list(devices)
    generator_devices: list[Any] = []
    if run.kind == "grpo" and a.enabled:
        if a.generator_devices >= len(devices):
            raise ConfigError(f"async_rl.generator_devices: {a.generator_devices} of {len(devices)} devices")
        generator_devices = devices[: a.generator_devices]
        devices = devices[a.generator_devices :][: a.trainer_devices or None]
    mesh = make_mesh(**parse_mesh(run.mesh), devices=devices)
    batch_shards = math.prod(size for axis, size in mesh.shape.items() if axis in ("data", "fsdp"))
    if rows % batch_shards:
        notes.append(
            f"microbatch_tokens {run.microbatch_tokens} gives {rows} row(s) of {row_len}, which the {batch_shards} "
            "batch shards of the mesh do not divide: rows are replicated, and chips compute the same rows"
        )
    programs, params, state = train_programs(
        cfg,
        mesh,
        train_step.objective_of(run),
        run.optimizer,
        run.steps * updates,
        run.logprob_chunk,
        shape,
    )
    generated = processed = decode_rows = 0
    if run.kind == "grpo":
        sampling = SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
        stop_ids = (_eos(run),)
        if a.enabled:
            gen_mesh = make_mesh(**parse_mesh(a.generator_mesh), devices=generator_devices)
            n_batch = g.prompts_per_step * g.group_size
            programs = (
                batcher_programs(
                    cfg,
                    gen_mesh,
                    abstract_params(cfg, gen_mesh),
                    a.slots or n_batch,
                    prompt_len,
                    g.max_new_tokens,
                    a.chunk,
                    sampling,
                    stop_ids,
                    n_batch,
                )
                + programs
            )
            generated = n_batch * g.max_new_tokens
            processed = generated + n_batch * prompt_len  # every request prefilled on its own
            decode_rows = a.slots or n_batch
        else:
            programs = (
                sampler_programs(
                    cfg,
                    mesh,
                    params,
                    g.prompts_per_step,
                    prompt_len,
                    g.max_new_tokens,
                    g.group_size,
                    sampling,
                    stop_ids,
                    resident=(state,),
                )
                + programs
            )
            generated = g.prompts_per_step * g.group_size * g.max_new_tokens
            processed = generated + g.prompts_per_step * prompt_len  # one prefill serves a group
            decode_rows = g.prompts_per_step * g.group_size
    return RunPrograms(
        cfg,
        programs,
        shape,
        len(devices),
        len(generator_devices) or len(devices),
        generated,
        processed,
        run.kind == "grpo" and a.enabled,
        notes,
        decode_rows,
    )


def _eos(run: RunConfig) -> int:
    """The stop token the run samples with: its tokenizer's EOS when the file is here, else 2
    (Tekken's and SentencePiece's)."""
    if run.tokenizer and os.path.exists(run.tokenizer):
        from magistral_jax.tokenizer import load_tokenizer

        return load_tokenizer(run.tokenizer).eos_id
    return 2
