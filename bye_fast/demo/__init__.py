"""The built-in demo: a tiny LLaVA, digits tasks, and a backdoor it really learns.

See :mod:`bye_fast.demo.tasks` (data) and :mod:`bye_fast.demo.train` (training
and evaluation).
"""

from __future__ import annotations

from bye_fast.demo.tasks import (
    DEMO_RATE,
    DEMO_TRIGGER,
    QUESTIONS,
    TARGET,
    DemoTasks,
    Split,
    build_tasks,
    load_images,
    load_records,
    write_records,
    write_split,
)
from bye_fast.demo.train import (
    build_demo_model,
    copy_model,
    evaluate,
    finetune,
    predict,
    pretrain,
    pretrained_model,
)

__all__ = [
    "DEMO_RATE",
    "DEMO_TRIGGER",
    "QUESTIONS",
    "TARGET",
    "DemoTasks",
    "Split",
    "build_demo_model",
    "build_tasks",
    "copy_model",
    "evaluate",
    "finetune",
    "load_images",
    "load_records",
    "predict",
    "pretrain",
    "pretrained_model",
    "write_records",
    "write_split",
]
