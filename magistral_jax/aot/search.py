"""Search: the meshes and remat policies of a model on a TPU slice, planned one by one, the fastest
estimate that fits kept, and the candidates that cannot win skipped without compiling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from magistral_jax.aot.planner import NO_REMAT, PlanResult, plan
from magistral_jax.aot.topologies import topology

if TYPE_CHECKING:
    from magistral_jax.config import ModelConfig


# From the least memory to the most: if one does not fit, the later ones do not either.
REMAT_ORDER = ("full", "save_qkv", "save_matmuls", "none")
SEARCH_TENSOR = (1, 2, 4, 8)


@dataclass
class Candidate:
    """One (mesh, remat) tried by `search`: its plan, or why it was skipped without compiling."""

    mesh: dict[str, int]
    remat: str
    result: PlanResult | None = None
    skipped: str | None = None

    @property
    def fits(self) -> bool:
        return self.result is not None and self.result.fits


def search_space(chips: int, task: str, tensor: Sequence[int] = SEARCH_TENSOR) -> list[tuple[dict[str, int], str]]:
    """Every split of `chips` over data x fsdp x tensor (tensor in `tensor`, data a power of two),
    with every remat policy for a train step (sampling has no backward pass: `NO_REMAT`)."""
    remats = REMAT_ORDER if task == "grpo" else (NO_REMAT,)
    space = []
    for t in tensor:
        if chips % t:
            continue
        rest = chips // t
        data = 1
        while data <= rest:
            if rest % data == 0:
                space.extend(({"data": data, "fsdp": rest // data, "tensor": t}, remat) for remat in remats)
            data *= 2
    return space


def _rank(remat: str) -> int:
    return REMAT_ORDER.index(remat) if remat in REMAT_ORDER else 0


def search(
    cfg: ModelConfig,
    topology_name: str,
    task: str,
    batch: int,
    seq_len: int,
    *,
    tensor: Sequence[int] = SEARCH_TENSOR,
    progress: Callable[[Candidate], None] | None = None,
    **kwargs: Any,
) -> tuple[list[Candidate], Candidate | None]:
    """Plans the candidates of `search_space` and returns them all and the fastest (by the
    roofline estimate) that fits, or None. `kwargs` go to `plan`.

    Candidates that cannot win are skipped without compiling: one that needs at least the memory
    of one that did not fit (a remat policy that saves more on the same mesh, or more data
    replicas on the same tensor split), and every data > 1 split: against data=1 with the same
    tensor split, data replicas hold more of the parameters and optimizer state per chip and do
    the same matmuls, and the estimate does not model the communication they would save.
    """
    topo = topology(topology_name)
    candidates: list[Candidate] = []
    failed: list[Candidate] = []
    for mesh, remat in search_space(topo.chips, task, tensor):
        cand = Candidate(mesh, remat)
        worse_than = next(
            (
                f
                for f in failed
                if f.mesh["tensor"] == mesh["tensor"]
                and f.mesh["data"] <= mesh["data"]
                and _rank(f.remat) <= _rank(remat)
            ),
            None,
        )
        if worse_than is not None:
            m = worse_than.mesh
            cand.skipped = f"needs more memory than data={m['data']},tensor={m['tensor']} remat {worse_than.remat}"
        elif mesh["data"] > 1:
            cand.skipped = f"data replicas: more memory, same estimate or worse than data=1,tensor={mesh['tensor']}"
        else:
            cand.result = plan(
                cfg,
                topology_name,
                task,
                batch,
                seq_len,
                mesh=mesh,
                remat=remat if task == "grpo" else None,
                **kwargs,
            )
            if not cand.result.fits:
                failed.append(cand)
        candidates.append(cand)
        if progress is not None:
            progress(cand)
    fitting = [c for c in candidates if c.fits and c.result is not None]
    best = min(fitting, key=lambda c: (c.result.step_s, c.result.peak_bytes)) if fitting else None  # type: ignore[union-attr]
    return candidates, best
