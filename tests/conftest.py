import os
import shutil
import tempfile

import pytest
import torch

# Tests never touch the user's cache, nor the user's registry (where `metalab train` indexes its runs).
os.environ.setdefault("METALAB_CACHE", tempfile.mkdtemp(prefix="metalab-test-cache-"))
os.environ["METALAB_HOME"] = tempfile.mkdtemp(prefix="metalab-test-home-")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from metalab.data.folders import from_arrays  # noqa: E402


def make_clusters(classes: int = 40, per_class: int = 20, dim: int = 32, informative: int = 4, noise: float = 2.5,
                  seed: int = 0, domains: int = 4):
    """A source where only ``informative`` dims carry the class and the rest are loud noise:
    an untrained learner is near chance, a learner that finds the informative dims is not."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, informative, generator=g) * 1.5
    y = torch.arange(classes).repeat_interleave(per_class)
    signal = centers[y] + 0.3 * torch.randn(len(y), informative, generator=g)
    x = torch.cat([signal, noise * torch.randn(len(y), dim - informative, generator=g)], 1)
    names = [f"class{c:02d}" for c in range(classes)]
    return from_arrays(x.numpy(), y.numpy(), names, torch.arange(classes) % domains,
                       [f"domain{d}" for d in range(domains)], name="clusters")


@pytest.fixture
def clusters():
    return make_clusters()


@pytest.fixture(scope="session")
def omniglot():
    from metalab.data.omniglot import load_omniglot

    return load_omniglot(28)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """A 2-layer, 32-wide random BERT saved as a sentence-transformers folder (4.6 MB)."""
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import models
    from transformers import BertConfig, BertModel

    from metalab.models.text_encoder import default_model_folder

    root = tmp_path_factory.mktemp("tiny-encoder")
    hf = root / "hf"
    hf.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_folder() / name, hf / name)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(hf)
    transformer = models.Transformer(str(hf), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, models.Pooling(32, "mean")])
    model.save(str(root / "st"))
    return root / "st"
