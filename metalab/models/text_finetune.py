"""Fine-tune the sentence encoder itself on one task's support set (the heavier transfer route).

SetFit fine-tunes with contrastive pairs, whose number grows with the square of the support
size. Here the encoder is trained end to end with a cosine classifier whose weights start at the
class prototypes (imprinting), which needs one pass per example per epoch and reaches the same
place on intent data: each sentence is pulled towards its class and away from the others.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Sequence

import torch
import torch.nn.functional as F

from metalab.engine.progress import progress_bar
from metalab.errors import ConfigError
from metalab.models.text_encoder import SentenceEncoder


def finetune_encoder(encoder: SentenceEncoder, texts: Sequence[str], labels: torch.Tensor, ways: int,
                     epochs: int = 6, lr: float = 3e-5, head_lr: float = 1e-2, batch_size: int = 32,
                     scale: float = 20.0, seed: int = 0, progress: bool = True) -> SentenceEncoder:
    """A copy of ``encoder`` fine-tuned on ``texts`` / ``labels [S]`` (``range(ways)``); the
    original is untouched. Its ``model_id`` gains a suffix so cached embeddings never mix.
    ``seed`` fixes the batch order and dropout, so the same call gives the same weights (on one
    machine and thread count); the caller's global random state is left as it was."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(texts) != len(labels) or len(texts) == 0:
        raise ConfigError(f"Fine-tuning needs one label per text; got {len(texts)} texts and {len(labels)} labels.")
    tuned = copy.copy(encoder)
    tuned.model = copy.deepcopy(encoder.model)
    settings = f"{lr},{head_lr},{batch_size},{scale}".encode()  # the weights depend on all of these
    digest = hashlib.sha256("\x00".join(texts).encode() + labels.numpy().tobytes() + settings).hexdigest()[:12]
    tuned.model_id = f"{encoder.model_id}-finetuned-e{epochs}-s{seed}-{digest}"
    model = tuned.model
    device = next(model.parameters()).device
    with torch.no_grad():
        start = encoder.encode(texts)
        protos = torch.zeros(ways, start.shape[1]).index_add_(0, labels, start)
    head = torch.nn.Parameter(F.normalize(protos, dim=-1).to(device))
    optimizer = torch.optim.AdamW([{"params": model.parameters(), "lr": lr}, {"params": [head], "lr": head_lr}],
                                  weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(texts) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * max(0.0, 1 - s / total))
    model.train()
    # dropout draws from the global generator: seed it here, and give the caller's state back afterwards
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            progress_bar("fine-tuning encoder", total, enabled=progress) as bar:
        torch.manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(texts), generator=g)
            for start_i in range(0, len(texts), batch_size):
                idx = order[start_i:start_i + batch_size]
                emb = F.normalize(_features(tuned, [texts[i] for i in idx]), dim=-1)
                loss = F.cross_entropy(scale * emb @ F.normalize(head, dim=-1).T, labels[idx].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.advance(1)
    model.eval()
    return tuned


def _features(encoder: SentenceEncoder, texts: list[str]) -> torch.Tensor:
    """Differentiable embeddings, the same ones ``encoder.encode`` returns at inference."""
    if encoder.layers:
        return encoder.layer_features(texts)
    model = encoder.model
    prepare = getattr(model, "preprocess", None) or model.tokenize
    features = prepare(texts)
    features = {k: (v.to(model.device) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}
    return model(features)["sentence_embedding"]
