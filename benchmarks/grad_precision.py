"""Float32 gradient precision of the conv4 layouts on this device, against float64.

    python -m benchmarks.grad_precision                        # MAML, ANIL, ProtoNet, 150 training steps each
    python -m benchmarks.grad_precision --algos maml --train-steps 0   # at initialisation

Each method is first meta-trained for ``--train-steps`` steps (Omniglot 28×28, 5-way 1-shot,
15 queries, meta-batch 16, fp32, the trainer's default layout), because gradients at
initialisation hide most of the round-off that builds up once the network has learned. Then
the same weights are copied into a float64 model (the reference) and into float32 models in
each ``train.memory_format`` (``channels_last``, what ``auto`` picks on CPU, and
``contiguous``, NCHW), and the meta-gradient of ``--batches`` fixed meta-batches is compared
with the float64 one: the relative error ``‖g32 − g64‖ / ‖g64‖`` of each block's parameters
(median over batches), the largest absolute error, and how many batches pass
``allclose(atol=1e-5, rtol=1e-4)`` on every gradient. The median, because some batches get a
large error in both layouts alike (most likely a max-pool window whose two largest values are
within float32 rounding, so the gradient goes to another pixel), which says nothing about a
layout's arithmetic.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from metalab.data import EpisodeSampler
from metalab.data.omniglot import load_omniglot
from metalab.engine import RunConfig
from metalab.engine.trainer import build_model

OPTIONS = {"maml": {"inner_lr": 0.4, "inner_steps": 1}, "fomaml": {"inner_lr": 0.4, "inner_steps": 1},
           "anil": {"inner_lr": 0.5, "inner_steps": 1}, "protonet": {}}
LAYOUTS = ("channels_last", "contiguous")


def _config(algo: str, memory_format: str) -> RunConfig:
    return RunConfig.from_dict({"train": {"algo": algo, "algo_options": OPTIONS.get(algo, {}), "device": "cpu",
                                          "memory_format": memory_format}})


def _batches(source, count: int, seed: int, dtype=torch.float32):
    for b in range(count):
        batch = EpisodeSampler(source, 5, 1, 15, 16, seed=seed + b).sample(0)
        batch.support_x, batch.query_x = batch.support_x.to(dtype), batch.query_x.to(dtype)
        yield batch


def trained_weights(algo: str, steps: int, source) -> dict[str, torch.Tensor]:
    """Weights after ``steps`` fp32 meta-training steps in the default layout (Adam, lr 1e-3)."""
    model = build_model(_config(algo, "auto"), (1, 28, 28), torch.device("cpu"), {"task": "classification"})
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    sampler = EpisodeSampler(source, 5, 1, 15, 16, seed=123)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        model.meta_backward(model.params(), sampler.sample(step))
        opt.step()
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def meta_gradients(algo: str, weights: dict, memory_format: str, dtype: torch.dtype, source, batches: int) -> list[dict]:
    model = build_model(_config(algo, memory_format), (1, 28, 28), torch.device("cpu"), {"task": "classification"})
    model.load_state_dict(weights)
    model = model.to(dtype).train()
    out = []
    for batch in _batches(source, batches, seed=2024, dtype=dtype):
        for p in model.parameters():
            p.grad = None
        model.meta_backward(model.params(), batch)
        out.append({k: p.grad.detach().to(torch.float64) for k, p in model.named_parameters() if p.grad is not None})
    return out


def _group(name: str) -> str:
    parts = name.split(".")
    return f"block {parts[parts.index('blocks') + 1]}" if "blocks" in parts else "head"


def compare(reference: list[dict], measured: list[dict]) -> dict:
    """Per block, the median over batches of the worst parameter's relative error; the largest
    absolute error; how many batches pass ``allclose(atol=1e-5, rtol=1e-4)`` on every gradient."""
    per_batch: dict[str, list[float]] = {}
    worst_abs, passing = 0.0, 0
    for ref, got in zip(reference, measured):
        batch_rel: dict[str, float] = {}
        for k, g64 in ref.items():
            err = (got[k] - g64).norm().item() / max(g64.norm().item(), 1e-30)
            batch_rel[_group(k)] = max(batch_rel.get(_group(k), 0.0), err)
            worst_abs = max(worst_abs, (got[k] - g64).abs().max().item())
        for group, err in batch_rel.items():
            per_batch.setdefault(group, []).append(err)
        passing += all(torch.allclose(got[k], g64, atol=1e-5, rtol=1e-4) for k, g64 in ref.items())
    rel = {group: statistics.median(errs) for group, errs in per_batch.items()}
    return {"relative": rel, "max_abs": worst_abs, "allclose": f"{passing}/{len(reference)}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="*", default=["maml", "anil", "protonet"], choices=sorted(OPTIONS))
    parser.add_argument("--train-steps", type=int, default=150, help="fp32 meta-training steps before measuring (0: at init)")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    source = load_omniglot(28)
    lines = [f"# fp32 meta-gradient precision by layout ({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads)", "",
             "Relative error ‖g32 − g64‖/‖g64‖ per block (its worst parameter; median over the batches), the "
             "largest absolute error, and the batches whose every gradient passes allclose(atol 1e-5, rtol 1e-4).", ""]
    header_done = False
    for algo in args.algos:
        start = time.perf_counter()
        weights, where = trained_weights(algo, args.train_steps, source), f"after {args.train_steps} steps"
        reference = meta_gradients(algo, weights, "contiguous", torch.float64, source, args.batches)
        for layout in LAYOUTS:
            result = compare(reference, meta_gradients(algo, weights, layout, torch.float32, source, args.batches))
            groups = list(result["relative"])
            if not header_done:
                lines += ["| method | weights | fp32 layout | " + " | ".join(groups) + " | max abs | batches passing allclose |",
                          "|---|---|---|" + "---|" * len(groups) + "---|---|"]
                header_done = True
            cells = " | ".join(f"{result['relative'][g]:.1e}" for g in groups)
            lines.append(f"| {algo} | {where} | {layout} | {cells} | {result['max_abs']:.1e} | {result['allclose']} |")
            print(lines[-1], flush=True)
        print(f"({algo}: {time.perf_counter() - start:.0f} s)", flush=True)
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
