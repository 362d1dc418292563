"""Meta-training the sentence encoder itself: its top transformer layers as a backbone.

A text run with ``train.tune_encoder`` trains the encoder's top ``N`` transformer layers (or all of
them) across episodes, under the run's head (ProtoNet's prototypes, R2D2's ridge head, …), so
that a new intent set is solved by a cheap head on the tuned embeddings (IntentBERT, Zhang et al.
2021, showed it for intents). What it learns is a few transformer layers, not a projection of
frozen features.

In training the examples are *ids* into the corpus: :class:`TunedTextBackbone` keeps every
training text's token states below the first tuned layer (computed once, frozen), pads the ids of
an episode, and runs only the tuned layers, so a step costs the tuned layers' forward and
backward, not the whole model's. Its features equal the tuned encoder's at inference
(:class:`~metalab.models.text_encoder.SentenceEncoder` with :func:`encoder_state` applied), where
the run embeds new texts and adapts exactly as a frozen-encoder run does.

Checkpoints hold only the tuned layers (``backbone.layers.<i>.*``, ``i`` counted from the first
tuned layer); the run's checkpoint info records the first tuned layer and the base model's id.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metalab.errors import ConfigError

#: which parameters of the tuned layers train: every one, or only LayerNorm scales/shifts and biases
TUNE_PARAMS = ("all", "norm-bias")


def num_layers(encoder) -> int:
    """Transformer layers of a sentence encoder (loads the model)."""
    return int(encoder.model[0].auto_model.config.num_hidden_layers)


def first_tuned_layer(tune: int | str, layers: int) -> int:
    """Index of the first tuned transformer layer (0-based) for ``tune`` (a count or ``'all'``)."""
    if tune == "all":
        return 0
    if not (isinstance(tune, int) and not isinstance(tune, bool) and 1 <= tune <= layers):
        raise ConfigError(f"train.tune_encoder={tune!r} is invalid; give a number of top layers from 1 to {layers}, or 'all'.")
    return layers - tune


def feature_layers(encoder) -> tuple[int, ...]:
    """Hidden-state indices the encoder's features pool (``0`` = embeddings): its ``layers``, or the
    last layer for the model's own pooling, which must then be mean pooling (as MiniLM's is)."""
    n = num_layers(encoder)
    if encoder.layers:
        return tuple(n + 1 + layer if layer < 0 else layer for layer in encoder.layers)
    modules = list(encoder.model)
    pooling = modules[1] if len(modules) > 1 else None
    mean = getattr(pooling, "pooling_mode_mean_tokens", None) or getattr(pooling, "pooling_mode", None) == "mean"
    extra = [type(m).__name__ for m in modules[2:] if type(m).__name__ != "Normalize"]
    if not mean or extra:
        raise ConfigError(f"Encoder '{encoder.folder}' pools its output in a way a tuned encoder cannot follow (not plain "
                          "mean pooling); set data.encoder_layers (e.g. [6]) so features are mean-pooled layers.")
    return (n,)


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked tokens ``[B, T, H]``, ``[B, T]`` → ``[B, H]``, L2-normalised."""
    m = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)


def combine(pooled: list[torch.Tensor], normalize: bool) -> torch.Tensor:
    """Per-layer pooled features side by side, as :meth:`SentenceEncoder.layer_features` joins them."""
    out = torch.cat(pooled, -1)
    return F.normalize(out, dim=-1) if normalize else out


def run_layers(layers: Sequence[nn.Module], hidden: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The output of each layer in turn for token states ``[B, T, H]`` with attention ``mask [B, T]``."""
    additive = (1.0 - mask.to(hidden.dtype))[:, None, None, :] * torch.finfo(hidden.dtype).min
    outs = []
    for layer in layers:
        hidden = layer(hidden, attention_mask=additive)
        if isinstance(hidden, tuple):  # (older transformers return a tuple)
            hidden = hidden[0]
        outs.append(hidden)
    return outs


class TunedTextBackbone(nn.Module):
    """Example ids ``[B]`` (or ``[B, 1]``) → features ``[B, D]`` of the encoder with trainable top layers.

    ``texts``: the corpus the ids index (only ``ids`` among them are prepared: the training and
    validation examples). The tuned layers are copies; the encoder itself is left unchanged.
    """

    def __init__(self, encoder, texts: Sequence[str], ids: torch.Tensor, tune: int | str, params: str = "all",
                 batch_size: int = 128, progress=None) -> None:
        super().__init__()
        if params not in TUNE_PARAMS:
            raise ConfigError(f"train.tune_params='{params}' is unknown; use one of: {', '.join(TUNE_PARAMS)}.")
        bert = encoder.model[0].auto_model
        n = num_layers(encoder)
        self.first = first_tuned_layer(tune, n)
        self.features = feature_layers(encoder)
        self.normalize = encoder.normalize
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in bert.encoder.layer[self.first:])
        for name, p in self.layers.named_parameters():
            p.requires_grad_(params == "all" or "LayerNorm" in name or name.endswith(".bias"))
        self.out_dim = bert.config.hidden_size * len(self.features)
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().unique()
        self._prepare(encoder, [texts[int(i)] for i in ids], ids, len(texts), batch_size, progress)

    @torch.no_grad()
    def _prepare(self, encoder, texts: list[str], ids: torch.Tensor, corpus_size: int, batch_size: int, progress) -> None:
        """Token states at the first tuned layer (flattened ``[tokens, H]`` with offsets and lengths
        per text) and the pooled features of the frozen layers, for every id."""
        transformer = encoder.model[0]
        tokens, lengths, frozen = [], torch.zeros(len(texts), dtype=torch.long), []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad least
        rows = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = transformer.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                          max_length=transformer.max_seq_length, return_tensors="pt")
            hidden = transformer.auto_model(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"]
            pooled = {layer: pool(hidden[layer], mask) for layer in self.features if layer <= self.first}
            for j, i in enumerate(chunk):
                n = int(mask[j].sum())
                rows[i] = (hidden[self.first][j, :n].float(), {k: v[j] for k, v in pooled.items()})
            if progress is not None:
                progress(len(chunk))
        for i, (states, pooled) in enumerate(rows):
            tokens.append(states)
            lengths[i] = states.shape[0]
            frozen.append(pooled)
        self.tokens = torch.cat(tokens)  # [total tokens, H]
        self.lengths = lengths
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        self.frozen = {layer: torch.stack([f[layer] for f in frozen]) for layer in self.features if layer <= self.first}
        self.row = torch.full((corpus_size,), -1, dtype=torch.long)  # corpus id → prepared row
        self.row[ids] = torch.arange(len(ids))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.row[ids.flatten().long().cpu()]
        if bool((rows < 0).any()):
            raise ConfigError("The tuned encoder was asked for texts it did not prepare (not meta-train or validation "
                              "examples); embed new texts with the run's encoder (metalab adapt / Run.adapt).")
        lengths = self.lengths[rows]
        width = int(lengths.max())
        positions = self.offsets[rows][:, None] + torch.arange(width)[None]
        mask = torch.arange(width)[None] < lengths[:, None]  # [B, T]
        device = next(self.layers.parameters()).device
        hidden = self.tokens[positions.clamp(max=self.tokens.shape[0] - 1)] * mask[..., None]
        hidden, mask = hidden.to(device), mask.to(device)
        outs = run_layers(self.layers, hidden, mask)
        pooled = [self.frozen[layer][rows].to(device) if layer <= self.first else pool(outs[layer - self.first - 1], mask)
                  for layer in self.features]
        return combine(pooled, self.normalize)


def encoder_state(backbone_state: dict[str, torch.Tensor], first: int, prefix: str = "backbone.layers.") -> dict[str, torch.Tensor]:
    """A tuned run's layer tensors (``backbone.layers.<i>.*``) as the base model's own keys
    (``encoder.layer.<first + i>.*``), ready for ``auto_model.load_state_dict(strict=False)``."""
    out = {}
    for key, value in backbone_state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            out[f"encoder.layer.{first + int(index)}.{rest}"] = value
    return out
