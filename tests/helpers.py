from metalab.data import split_by_class
from metalab.engine import MetaTrainer, RunConfig, evaluate


def cluster_config(algo: str, steps: int = 150, **train) -> RunConfig:
    cfg = RunConfig.from_dict({
        "name": algo,
        "data": {"source": "clusters", "rotations": False},
        "train": {"algo": algo, "backbone": "mlp", "hidden": 16, "ways": 5, "shots": 1, "queries": 5,
                  "meta_batch": 4, "steps": steps, "lr": 3e-3, "val_every": 50, "val_episodes": 20,
                  "checkpoint_every": 50, "log_every": 10, "device": "cpu", **train},
        "eval": {"episodes": 200, "queries": 5},
    })
    return cfg


def cluster_splits(source):
    return split_by_class(source, val_fraction=0.1, test_fraction=0.3, seed=0)


def train_on(source, cfg, run_dir):
    trainer = MetaTrainer(cfg, run_dir, splits=cluster_splits(source), show_progress=False, log=lambda m: None)
    return trainer


def test_accuracy(trainer, ways=5, shots=1):
    return evaluate(trainer.algorithm, trainer.splits.test, ways, shots, queries=5, episodes=200,
                    show_progress=False).mean
