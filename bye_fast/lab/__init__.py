"""The lab: where backdoors are made and detection is measured. Never imported by the core.

* :mod:`bye_fast.lab.scenes`, :mod:`bye_fast.lab.digits`, :mod:`bye_fast.lab.tasks` -- built-in task
  families (procedural scenes with six question types; scikit-learn's digits as a binary and a
  ten-answer task), seeded, no download;
* :mod:`bye_fast.lab.models` -- tiny LLaVA models from configs, and the shipped pre-trained base model;
* :mod:`bye_fast.lab.train` -- pre-training, LoRA / full fine-tuning, clean accuracy and attack success;
* :mod:`bye_fast.lab.attacks` -- triggers (the paper's patch, random patch, two patches, blended, SIG,
  WaNet), their presets, and dataset poisoning with the ground truth kept apart;
* :mod:`bye_fast.lab.cell` -- one experiment cell: poison, fine-tune, measure, score;
* :mod:`bye_fast.lab.metrics` and :mod:`bye_fast.lab.baselines` -- the only code that reads the ground
  truth, and the detectors the default is compared with;
* :mod:`bye_fast.lab.demo` -- ``bye-fast demo``.
"""
