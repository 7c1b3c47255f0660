"""``Scores``: what one prefill pass measures about each sample's last prompt token.

Every per-sample array of a :class:`Scores` is described once, in
:data:`FIELDS`; saving, loading, subsets, concatenation, the row buffers of
scoring and checkpoints and the distributed gather all iterate that table.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bye_fast._io import atomic_write

__all__ = ["FIELDS", "Field", "RowBuffer", "Scores"]

_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class Field:
    """One per-sample array of :class:`Scores`.

    ``dims`` names the axes after the sample axis: "L" decoder layers, "H" query
    heads, "D" the text decoder's hidden size, "V" the vision features' size.
    """

    name: str
    dims: tuple[str, ...]
    dtype: type
    doc: str


#: The per-sample arrays of :class:`Scores`, in file order. ``entropy`` is required, the rest optional.
FIELDS: tuple[Field, ...] = (
    Field("entropy", ("L",), np.float32,
          "the paper's statistic: entropy of the head-MEAN attention of the last prompt token, "
          "renormalised over the image tokens, -sum_t p_t log(p_t + 1e-8) (natural log)"),
    Field("head_entropy", ("L", "H"), np.float32,
          "entropy of each head's attention renormalised over the image tokens"),
    Field("image_mass", ("L",), np.float32, "head-mean share of the attention on the image tokens"),
    Field("head_image_share", ("L", "H"), np.float32, "each head's share of the attention on the image tokens"),
    Field("head_before_share", ("L", "H"), np.float32,
          "each head's share on the text before the first image token (system prompt, BOS); the rest, "
          "1 - image - before, is on the text after the image (question, template, the query token)"),
    Field("image_topk_share", ("L",), np.float32,
          "spatial concentration: share of the head-mean image attention held by its k most-attended "
          "image tokens (k in meta['topk'])"),
    Field("answer_token", (), np.int64, "the model's greedy first answer token (id) at the last prompt token"),
    Field("answer_confidence", (), np.float32, "the model's probability of that token"),
    Field("answer_margin", (), np.float32,
          "its logit minus the runner-up's (a confidence that does not saturate at probability 1)"),
    Field("hidden", ("D",), np.float32,
          "the last prompt token's final hidden state (after the final norm); only with score(hidden_states=True)"),
    Field("image_embedding", ("V",), np.float32,
          "the vision features the projector reads (the vision tower's, before the fine-tuned projector), "
          "averaged over the image's tokens; only with score(image_embeddings=True)"),
    Field("prompt_key", (), np.int64,
          "a 64-bit hash of the prompt's text tokens (every attended token up to the last prompt token, "
          "image tokens left out): samples that ask the same question in the same template share it"),
    Field("n_image_tokens", (), np.int64, "number of image tokens of the sample"),
)  # fmt: skip
_NAMES = tuple(f.name for f in FIELDS)


_INT64_MAX = int(np.iinfo(np.int64).max)


def _as_ids(ids) -> np.ndarray:
    """Sample ids, kept exactly: int64 when every id is an int that fits, else text (an int as its
    decimal digits, so it still matches by text). A float or bool id is refused (``ValueError``):
    numpy would turn ``[2**63, 3]`` into floats and ``1.0`` could not be told from ``1``."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "US":
        return ids.astype(str)
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "i":
        return ids.astype(np.int64)
    values = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    text = False
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, str, bytes, np.str_, np.bytes_)):
            raise ValueError(f"ids must be str or int (kept exactly); ids[{i}] is {type(v).__name__} {v!r}")
        text = text or not isinstance(v, (int, np.integer)) or not -_INT64_MAX - 1 <= int(v) <= _INT64_MAX
    if not text:
        return np.array([int(v) for v in values], dtype=np.int64)
    out = [bytes(v).decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v) for v in values]
    return np.array(out, dtype=str)


@dataclass
class Scores:
    """Attention statistics of the last prompt token, one row per sample.

    Attributes
    ----------
    entropy : (n_samples, n_layers) float32
        The paper's statistic (see :data:`FIELDS`). NaN for a sample without image tokens.
    head_entropy, head_image_share, head_before_share : (n_samples, n_layers, n_heads) float32 or None
    image_mass, image_topk_share : (n_samples, n_layers) float32 or None
    answer_token : (n_samples,) int64 or None
    answer_confidence, answer_margin : (n_samples,) float32 or None
    hidden : (n_samples, hidden_size) float32 or None
    image_embedding : (n_samples, vision_size) float32 or None
    prompt_key : (n_samples,) int64 or None
    n_image_tokens : (n_samples,) int64 or None
    ids : (n_samples,) str or int64
        Sample ids, in the order the samples were scored. Default ``0..n-1``.
    meta : dict
        Free-form provenance (model name, method, options); saved as strings.

    :data:`FIELDS` documents each array.
    """

    entropy: np.ndarray
    head_entropy: np.ndarray | None = None
    image_mass: np.ndarray | None = None
    head_image_share: np.ndarray | None = None
    head_before_share: np.ndarray | None = None
    image_topk_share: np.ndarray | None = None
    answer_token: np.ndarray | None = None
    answer_confidence: np.ndarray | None = None
    answer_margin: np.ndarray | None = None
    hidden: np.ndarray | None = None
    image_embedding: np.ndarray | None = None
    prompt_key: np.ndarray | None = None
    n_image_tokens: np.ndarray | None = None
    ids: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.entropy = np.asarray(self.entropy, dtype=np.float32)
        if self.entropy.ndim != 2:
            raise ValueError(f"entropy must be (n_samples, n_layers); got shape {self.entropy.shape}")
        n = self.entropy.shape[0]
        sizes: dict[str, int] = {"L": self.entropy.shape[1]}
        for f in FIELDS[1:]:
            value = getattr(self, f.name)
            if value is None:
                continue
            value = np.asarray(value, dtype=f.dtype)
            want = (n, *(sizes.get(d) for d in f.dims))
            ok = value.ndim == len(want) and all(
                w is None or w == v for w, v in zip(want, value.shape, strict=True)
            )
            if not ok:
                axes = ", ".join(
                    ["n_samples", *({"L": "n_layers", "H": "n_heads", "D": "hidden_size", "V": "vision_size"}[d] for d in f.dims)]
                )
                shown = tuple("?" if w is None else w for w in want)
                raise ValueError(f"{f.name} must be ({axes}) = {shown}; got {value.shape}")
            for d, v in zip(f.dims, value.shape[1:], strict=True):
                sizes.setdefault(d, v)
            setattr(self, f.name, value)
        self.ids = np.arange(n, dtype=np.int64) if self.ids is None else _as_ids(self.ids)
        if self.ids.shape != (n,):
            raise ValueError(f"ids must have one entry per sample ({n}); got shape {self.ids.shape}")
        if len(set(self.ids.tolist())) != n:
            seen: set = set()
            dup = next(i for i in self.ids.tolist() if i in seen or seen.add(i))
            raise ValueError(f"ids must be unique; {dup!r} appears more than once")
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
        for name in ("head_entropy", "head_image_share", "head_before_share"):
            value = getattr(self, name)
            if value is not None:
                return value.shape[2]
        return None

    @property
    def head_after_share(self) -> np.ndarray | None:
        """Each head's share of the attention on the text after the image (``1 - image - before``)."""
        if self.head_image_share is None or self.head_before_share is None:
            return None
        return 1.0 - self.head_image_share - self.head_before_share

    @property
    def no_image_ids(self) -> list:
        """Ids of samples that had no image token (their statistics are NaN)."""
        if self.n_image_tokens is not None:
            bad = self.n_image_tokens == 0
        else:
            bad = np.isnan(self.entropy).all(axis=1)
        return self.ids[bad].tolist()

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-sample arrays that are present, by name (in :data:`FIELDS` order)."""
        return {name: getattr(self, name) for name in _NAMES if getattr(self, name) is not None}

    def __len__(self) -> int:
        return self.n_samples

    def __repr__(self) -> str:
        heads = "" if self.n_heads is None else f", n_heads={self.n_heads}"
        return f"Scores(n_samples={self.n_samples}, n_layers={self.n_layers}{heads}, fields={list(self.arrays())})"

    def subset(self, index) -> Scores:
        """Rows selected by a boolean mask or an integer index array."""
        index = np.asarray(index)
        return Scores(**{k: v[index] for k, v in self.arrays().items()}, ids=self.ids[index], meta=self.meta)

    @classmethod
    def concatenate(cls, parts: list[Scores]) -> Scores:
        """Stack the rows of several ``Scores`` (same layers/heads) in order.

        A field is kept only if every part has it.
        """
        if not parts:
            raise ValueError("concatenate needs at least one Scores")
        names = [n for n in _NAMES if all(getattr(p, n) is not None for p in parts)]
        arrays = {n: np.concatenate([getattr(p, n) for p in parts], axis=0) for n in names}
        return cls(**arrays, ids=np.concatenate([p.ids for p in parts]), meta=parts[0].meta)

    # --------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` file atomically (temp file + rename). Returns the path."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"scores are saved as .npz; got {path}")
        arrays = {"format_version": np.array(_FORMAT_VERSION), **self.arrays(), "ids": self.ids}
        arrays["meta_keys"] = np.array(list(self.meta.keys()), dtype=str)
        arrays["meta_values"] = np.array([str(v) for v in self.meta.values()], dtype=str)
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        """Read a file written by :meth:`save` (this version or an earlier one).

        Raises ``ValueError`` naming the file when it is not a scores file (another kind of
        file, a truncated or damaged archive); pickled data is never loaded.
        """
        what = f"{path}: not a bye_fast scores file (the .npz `bye-fast score` writes)"
        with open(path, "rb"):  # a missing or unreadable file: the OSError that names it
            pass
        if not zipfile.is_zipfile(path):  # np.load would take it as .npy, or as a pickle it refuses
            raise ValueError(f"{what}: not a complete .npz (zip) archive: truncated, or another kind of file")
        try:
            with np.load(path, allow_pickle=False) as z:
                version = int(z["format_version"]) if "format_version" in z else None
                if version not in _READABLE_VERSIONS:
                    raise ValueError(f"{path}: not a bye_fast scores file (format_version={version})")
                meta = dict(zip(z["meta_keys"].tolist(), z["meta_values"].tolist(), strict=True))
                arrays = {n: z[n] for n in _NAMES if n in z}
                return cls(**arrays, ids=z["ids"], meta=meta)
        except ValueError as err:
            if str(err).startswith(f"{path}: "):
                raise
            raise ValueError(f"{what}: {err}") from None
        except (zipfile.BadZipFile, EOFError, KeyError) as err:
            raise ValueError(f"{what}: damaged ({type(err).__name__}: {err})") from None


@dataclass
class RowBuffer:
    """Scored rows collected batch by batch, turned into one :class:`Scores` at the end."""

    rows: dict[str, list[np.ndarray]] = field(default_factory=dict)
    ids: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, arrays: dict[str, np.ndarray], ids: list) -> None:
        """One batch's arrays (by :data:`FIELDS` name; ``entropy`` required) and ids."""
        unknown = set(arrays) - set(_NAMES)
        if unknown:
            raise ValueError(f"unknown Scores fields {sorted(unknown)}")
        if self.rows and set(arrays) != set(self.rows):
            raise ValueError(f"batch has fields {sorted(arrays)}, earlier batches {sorted(self.rows)}")
        for name, value in arrays.items():
            self.rows.setdefault(name, []).append(value)
        self.ids.extend(ids)

    def add_scores(self, part: Scores) -> None:
        self.add(part.arrays(), part.ids.tolist())

    def to_scores(self, meta: dict) -> Scores:
        """The rows so far (at least one batch) as ``Scores``."""
        arrays = {name: np.concatenate(parts) for name, parts in self.rows.items()}
        return Scores(**arrays, ids=self.ids, meta=meta)
