"""Embedding speed: metalab's mean-pooled-layers path against sentence-transformers' own ``encode``.

    python -m benchmarks.text_embed_speed [--rounds 3] [--out benchmarks/results/text_embed_speed.md]

The same model (all-MiniLM-L6-v2) and texts (HWU64's 1,076 test utterances), no embedding cache,
batch size 64; the arms alternate each round and the median CPU time per arm is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from metalab.data.text import load_hwu64
from metalab.models.text_encoder import SentenceEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/text_embed_speed.md"))
    args = parser.parse_args()
    corpus = load_hwu64()
    texts = [t for t, p in zip(corpus.texts, corpus.parts) if p == "test"]
    pooled, layers = SentenceEncoder(layers=None).load(), SentenceEncoder(layers=(4, 5, 6))
    layers.model = pooled.model  # one model in memory: the arms differ in the path only
    arms = {"sentence-transformers encode (pooled)": pooled, "metalab layers 4-6": layers}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, encoder in arms.items():
            start = time.process_time()
            encoder.encode(texts, batch_size=64)
            times[name].append(time.process_time() - start)
    base = statistics.median(times["sentence-transformers encode (pooled)"])
    lines = [f"# Embedding speed (`python -m benchmarks.text_embed_speed --rounds {args.rounds}`)", "",
             f"{len(texts)} HWU64 test texts, batch 64, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
             "median CPU seconds over rounds, arms alternating.", "",
             "| path | CPU s | ms per text | relative to encode |", "|---|---|---|---|"]
    for name, values in times.items():
        t = statistics.median(values)
        lines.append(f"| {name} | {t:.2f} | {1000 * t / len(texts):.2f} | {t / base:.2f}× |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
