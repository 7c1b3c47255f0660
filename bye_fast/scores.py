"""``Scores``: the per-sample, per-layer attention statistics that BYE works on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bye_fast._io import atomic_write

__all__ = ["RowBuffer", "Scores"]

_FORMAT_VERSION = 1


def _as_ids(ids) -> np.ndarray:
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    return arr.astype(str)


@dataclass
class Scores:
    """Attention statistics of the last prompt token, one row per sample.

    Parameters
    ----------
    entropy : (n_samples, n_layers) float32
        The paper's statistic: entropy of the head-MEAN attention of the last
        prompt token, renormalised over the image tokens,
        ``-sum_t p_t * log(p_t + 1e-8)`` (natural log). NaN for a sample
        without image tokens.
    head_entropy : (n_samples, n_layers, n_heads) float32 or None
        Entropy of each head's attention renormalised over the image tokens.
    image_mass : (n_samples, n_layers) float32 or None
        Head-mean share of the last token's attention that falls on image tokens.
    ids : (n_samples,) str or int64
        Sample ids, in the order the samples were scored. Default ``0..n-1``.
    n_image_tokens : (n_samples,) int64 or None
        Number of image tokens of each sample.
    meta : dict
        Free-form provenance (model name, method, versions); saved as strings.
    """

    entropy: np.ndarray
    head_entropy: np.ndarray | None = None
    image_mass: np.ndarray | None = None
    ids: np.ndarray | None = None
    n_image_tokens: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.entropy = np.asarray(self.entropy, dtype=np.float32)
        if self.entropy.ndim != 2:
            raise ValueError(f"entropy must be (n_samples, n_layers); got shape {self.entropy.shape}")
        n, n_layers = self.entropy.shape
        if self.head_entropy is not None:
            self.head_entropy = np.asarray(self.head_entropy, dtype=np.float32)
            if self.head_entropy.ndim != 3 or self.head_entropy.shape[:2] != (n, n_layers):
                raise ValueError(
                    f"head_entropy must be (n_samples, n_layers, n_heads) = ({n}, {n_layers}, H); "
                    f"got {self.head_entropy.shape}"
                )
        if self.image_mass is not None:
            self.image_mass = np.asarray(self.image_mass, dtype=np.float32)
            if self.image_mass.shape != (n, n_layers):
                raise ValueError(f"image_mass must be ({n}, {n_layers}); got {self.image_mass.shape}")
        self.ids = np.arange(n, dtype=np.int64) if self.ids is None else _as_ids(self.ids)
        if self.ids.shape != (n,):
            raise ValueError(f"ids must have one entry per sample ({n}); got shape {self.ids.shape}")
        if len(set(self.ids.tolist())) != n:
            seen: set = set()
            dup = next(i for i in self.ids.tolist() if i in seen or seen.add(i))
            raise ValueError(f"ids must be unique; {dup!r} appears more than once")
        if self.n_image_tokens is not None:
            self.n_image_tokens = np.asarray(self.n_image_tokens, dtype=np.int64)
            if self.n_image_tokens.shape != (n,):
                raise ValueError(f"n_image_tokens must be ({n},); got {self.n_image_tokens.shape}")
        self.meta = dict(self.meta)

    # ------------------------------------------------------------------ views
    @property
    def n_samples(self) -> int:
        return self.entropy.shape[0]

    @property
    def n_layers(self) -> int:
        return self.entropy.shape[1]

    @property
    def n_heads(self) -> int | None:
        return None if self.head_entropy is None else self.head_entropy.shape[2]

    @property
    def no_image_ids(self) -> list:
        """Ids of samples that had no image token (their statistics are NaN)."""
        if self.n_image_tokens is not None:
            bad = self.n_image_tokens == 0
        else:
            bad = np.isnan(self.entropy).all(axis=1)
        return self.ids[bad].tolist()

    def __len__(self) -> int:
        return self.n_samples

    def __repr__(self) -> str:
        heads = "" if self.head_entropy is None else f", n_heads={self.n_heads}"
        return f"Scores(n_samples={self.n_samples}, n_layers={self.n_layers}{heads})"

    def subset(self, index) -> Scores:
        """Rows selected by a boolean mask or an integer index array."""
        index = np.asarray(index)

        def take(a):
            return None if a is None else a[index]

        return Scores(
            entropy=self.entropy[index],
            head_entropy=take(self.head_entropy),
            image_mass=take(self.image_mass),
            ids=self.ids[index],
            n_image_tokens=take(self.n_image_tokens),
            meta=self.meta,
        )

    @classmethod
    def concatenate(cls, parts: list[Scores]) -> Scores:
        """Stack the rows of several ``Scores`` (same layers/heads) in order."""
        if not parts:
            raise ValueError("concatenate needs at least one Scores")

        def cat(name):
            arrays = [getattr(p, name) for p in parts]
            if any(a is None for a in arrays):
                return None
            return np.concatenate(arrays, axis=0)

        return cls(
            entropy=cat("entropy"),
            head_entropy=cat("head_entropy"),
            image_mass=cat("image_mass"),
            ids=np.concatenate([p.ids for p in parts]),
            n_image_tokens=cat("n_image_tokens"),
            meta=parts[0].meta,
        )

    # --------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` file atomically (temp file + rename). Returns the path."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"scores are saved as .npz; got {path}")
        arrays = {"format_version": np.array(_FORMAT_VERSION), "entropy": self.entropy, "ids": self.ids}
        for name in ("head_entropy", "image_mass", "n_image_tokens"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        arrays["meta_keys"] = np.array(list(self.meta.keys()), dtype=str)
        arrays["meta_values"] = np.array([str(v) for v in self.meta.values()], dtype=str)
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        """Read a file written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            version = int(z["format_version"]) if "format_version" in z else None
            if version != _FORMAT_VERSION:
                raise ValueError(f"{path}: not a bye_fast scores file (format_version={version})")
            meta = dict(zip(z["meta_keys"].tolist(), z["meta_values"].tolist(), strict=True))
            return cls(
                entropy=z["entropy"],
                head_entropy=z["head_entropy"] if "head_entropy" in z else None,
                image_mass=z["image_mass"] if "image_mass" in z else None,
                ids=z["ids"],
                n_image_tokens=z["n_image_tokens"] if "n_image_tokens" in z else None,
                meta=meta,
            )


@dataclass
class RowBuffer:
    """Scored rows collected batch by batch, turned into one :class:`Scores` at the end."""

    entropy: list[np.ndarray] = field(default_factory=list)
    head_entropy: list[np.ndarray] = field(default_factory=list)
    image_mass: list[np.ndarray] = field(default_factory=list)
    n_image_tokens: list[np.ndarray] = field(default_factory=list)
    ids: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ent: np.ndarray, he: np.ndarray, mass: np.ndarray, n_img: np.ndarray, ids: list) -> None:
        self.entropy.append(ent)
        self.head_entropy.append(he)
        self.image_mass.append(mass)
        self.n_image_tokens.append(n_img)
        self.ids.extend(ids)

    def add_scores(self, part: Scores) -> None:
        self.add(part.entropy, part.head_entropy, part.image_mass, part.n_image_tokens, part.ids.tolist())

    def to_scores(self, meta: dict) -> Scores:
        """The rows so far (at least one batch) as ``Scores``."""
        return Scores(
            entropy=np.concatenate(self.entropy),
            head_entropy=np.concatenate(self.head_entropy),
            image_mass=np.concatenate(self.image_mass),
            ids=self.ids,
            n_image_tokens=np.concatenate(self.n_image_tokens),
            meta=meta,
        )
