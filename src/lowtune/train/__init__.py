"""Training: QLoRA / LoRA / full fine-tuning on accelerate, writing a self-describing run folder.

Layer 2: imports data, models, templates, generation, runs, config; never infer or export.
"""

from lowtune.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
