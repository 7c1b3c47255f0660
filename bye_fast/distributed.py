"""Scoring on several processes with ``torch.distributed``.

Each rank scores its own shard of the data; :func:`gather_scores` then gives
every rank the full :class:`~bye_fast.scores.Scores`, rank 0's rows first.
With contiguous shards in rank order (:func:`bye_fast.data.shard_indices`,
which :func:`bye_fast.data.make_loader` uses) that is the original order.

:func:`merge_stats_across_ranks` combines per-rank running statistics
(anything with ``to_bytes()`` / ``from_bytes()`` / ``merge()``, such as
``bye_fast.stats.BimodalStats``) into the statistics of all ranks.

Both are collective calls: every rank of the group must call them, in the
same order. With the NCCL backend, set each rank's CUDA device first
(``torch.cuda.set_device(local_rank)``); objects travel through it.
"""

from __future__ import annotations

import traceback
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from bye_fast.scores import Scores

__all__ = ["gather_scores", "merge_stats_across_ranks", "rank_and_world_size"]


class Mergeable(Protocol):
    """Running statistics that can be serialised and merged."""

    def to_bytes(self) -> bytes: ...

    def merge(self, other: Any) -> Any: ...


S = TypeVar("S", bound=Mergeable)


def rank_and_world_size(group: Any = None) -> tuple[int, int] | None:
    """``(rank, world_size)`` when a ``torch.distributed`` process group is initialised, else None."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def _all_gather(obj: Any, group: Any) -> list[Any]:
    world = torch.distributed.get_world_size(group)
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def _payload(scores: Scores | None, ids_given: bool, error: BaseException | None) -> dict[str, Any]:
    if error is not None:
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
        return {"error": text}
    assert scores is not None
    return {
        "error": None,
        "ids_given": bool(ids_given) and scores.n_samples > 0,
        "arrays": scores.arrays(),
        "ids": scores.ids,
        "meta": scores.meta,
    }


def gather_scores(
    scores: Scores | None,
    *,
    ids_given: bool = True,
    error: BaseException | None = None,
    group: Any = None,
) -> Scores:
    """Every rank's rows, in rank order, on every rank (a collective call).

    Parameters
    ----------
    scores : Scores or None
        This rank's rows (may have 0 rows; None only together with ``error``).
    ids_given : bool
        Whether this rank's ids are the user's. When no rank's ids are given
        (every rank numbered its own rows ``0..n_r-1``), the result is
        renumbered ``0..n-1`` in rank order, as one process would number them.
    error : BaseException, optional
        This rank failed with ``error``: it is re-raised here after the
        exchange, and the other ranks raise a ``RuntimeError`` naming this
        rank instead of waiting for it forever.
    group : torch.distributed process group, optional
        Default: the world.

    Returns
    -------
    Scores
        All rows: rank 0's first, then rank 1's, ...

    Raises
    ------
    ValueError
        If an id was scored by two ranks (the shards overlap), or if ranks mix
        given and default ids, or if no rank has any row.
    """
    parts = _all_gather(_payload(scores, ids_given, error), group)
    if error is not None:
        raise error
    failed = [(r, p["error"]) for r, p in enumerate(parts) if p["error"] is not None]
    if failed:
        rank, text = failed[0]
        raise RuntimeError(f"bye_fast: rank {rank} failed while scoring its shard: {text}")
    nonempty = [(r, p) for r, p in enumerate(parts) if len(p["ids"])]
    if not nonempty:
        raise ValueError("no rank's loader yielded a batch: nothing to score")
    given = {r for r, p in nonempty if p["ids_given"]}
    if given and len(given) != len(nonempty):
        default = sorted({r for r, _ in nonempty} - given)
        raise ValueError(
            f"ranks {sorted(given)} give sample ids but ranks {default} do not: give 'ids' in every batch "
            "on every rank, or on none"
        )
    if given:
        owner: dict[Any, int] = {}
        for r, p in nonempty:
            for i in p["ids"].tolist():
                if i in owner:
                    raise ValueError(
                        f"id {i!r} was scored by rank {owner[i]} and rank {r}: each rank must get a disjoint "
                        "shard of the data (bye_fast.data.make_loader shards by rank; for your own loader "
                        "use bye_fast.data.shard_indices(n, rank, world_size))"
                    )
                owner[i] = r

    names = [n for n in nonempty[0][1]["arrays"] if all(n in p["arrays"] for _, p in nonempty)]
    arrays = {n: np.concatenate([p["arrays"][n] for _, p in nonempty], axis=0) for n in names}
    if given:
        ids = np.concatenate([p["ids"] for _, p in nonempty])
    else:
        ids = np.arange(sum(len(p["ids"]) for _, p in nonempty), dtype=np.int64)
    return Scores(**arrays, ids=ids, meta=nonempty[0][1]["meta"])


def merge_stats_across_ranks(stats: S, *, group: Any = None) -> S:
    """The statistics of all ranks, merged in rank order, on every rank (a collective call).

    Works on any object with ``to_bytes()``, a classmethod ``from_bytes(blob)``
    and ``merge(other)`` (which merges ``other`` into the object; its return
    value is not used), such as ``bye_fast.stats.BimodalStats``. Every rank
    gets an equal result, since every rank merges the same blobs in the same
    order. Without an initialised process group, the result is a copy of ``stats``.

    Parameters
    ----------
    stats : object with to_bytes / from_bytes / merge
        This rank's statistics (not modified).
    group : torch.distributed process group, optional
        Default: the world.

    Returns
    -------
    A new object of ``type(stats)`` holding every rank's data.
    """
    for name in ("to_bytes", "from_bytes", "merge"):
        if not callable(getattr(stats, name, None)):
            raise TypeError(
                f"merge_stats_across_ranks needs an object with {name}(); got {type(stats).__name__}"
            )
    if rank_and_world_size(group) is None:
        return type(stats).from_bytes(stats.to_bytes())  # a copy, as with a group
    blobs = _all_gather(stats.to_bytes(), group)
    cls = type(stats)
    merged = cls.from_bytes(blobs[0])
    for blob in blobs[1:]:
        merged.merge(cls.from_bytes(blob))
    return merged
