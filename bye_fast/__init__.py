"""bye_fast: fast, low-memory "Believe Your Eyes" backdoor-sample detection.

import bye_fast
scores = bye_fast.score(model, loader)        # stage 1: attention entropy
det = bye_fast.detect(scores)                 # stages 2-3: profile + cluster
bye_fast.filter_dataset("train.json", det, "train.clean.json")
"""

from __future__ import annotations

from bye_fast.data import filter_dataset
from bye_fast.detect import Detection, detect
from bye_fast.score import score, score_reference
from bye_fast.scores import Scores

__version__ = "0.1.0"

__all__ = ["Detection", "Scores", "__version__", "detect", "filter_dataset", "score", "score_reference"]
