"""bye_fast: fast, low-memory "Believe Your Eyes" backdoor-sample detection.

import bye_fast
scores = bye_fast.score(model, loader)        # stage 1: one forward pass per batch
det = bye_fast.detect(scores)                 # stages 2-3: decide, with a reason
bye_fast.filter_dataset("train.json", det, "train.clean.json")

The public names are imported on first use, so that ``import bye_fast`` (and
``bye-fast --help``) does not load torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_PUBLIC = {
    "Detection": "bye_fast.detect",
    "Scores": "bye_fast.scores",
    "detect": "bye_fast.detect",
    "filter_dataset": "bye_fast.filter",
    "score": "bye_fast.score",
    "score_reference": "bye_fast.score",
}

__all__ = ["Detection", "Scores", "__version__", "detect", "filter_dataset", "score", "score_reference"]

if TYPE_CHECKING:
    from bye_fast.detect import Detection, detect
    from bye_fast.filter import filter_dataset
    from bye_fast.score import score, score_reference
    from bye_fast.scores import Scores


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'bye_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``bye_fast.score`` and ``bye_fast.detect`` stay the functions when their modules
    (``bye_fast/score.py``, ``bye_fast/detect.py``) are imported: the import system's
    "set the submodule as an attribute of its package" is ignored for the public names."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
