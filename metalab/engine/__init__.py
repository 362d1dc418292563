"""Engine: meta-training loop, checkpoints, run folders, evaluation."""

from metalab.engine.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from metalab.engine.evaluate import EvalResult, evaluate
from metalab.engine.run import RunFolder
from metalab.engine.trainer import MetaTrainer, TrainResult, load_trained

__all__ = [
    "DataConfig", "EvalConfig", "EvalResult", "MetaTrainer", "RunConfig", "RunFolder", "TrainConfig",
    "TrainResult", "evaluate", "load_trained",
]
