"""A lexical classifier fitted on one task's support texts: TF-IDF n-grams + logistic regression.

Sentence encoders compress an utterance into one vector and can blur the word that decides the
intent ("freeze my card" against "replace my card"). Character n-grams inside words (2-5) and
word uni/bigrams keep those cues. The classifier sees only the task's own support texts (its
vocabulary and IDF weights are fitted on them), so it adds no data, and its log-probabilities are
added, with a small weight, to an embedding head's (:func:`combine_log_probs`).

scikit-learn's ``TfidfVectorizer`` and ``LogisticRegression`` do the work.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from metalab.errors import ConfigError


class LexicalClassifier:
    """TF-IDF (character 2-5 grams within words + word 1-2 grams, sublinear tf) and multinomial
    logistic regression with inverse regularisation ``c``."""

    def __init__(self, c: float = 30.0, char_ngrams: tuple[int, int] = (2, 5), word_ngrams: tuple[int, int] = (1, 2),
                 max_iter: int = 500):
        if c <= 0:
            raise ConfigError(f"The lexical classifier's c must be positive; got {c}.")
        self.c, self.char_ngrams, self.word_ngrams, self.max_iter = c, char_ngrams, word_ngrams, max_iter
        self.ways = 0

    def fit(self, texts: Sequence[str], labels: torch.Tensor, ways: int) -> "LexicalClassifier":
        """Fit on support ``texts`` with ``labels [S]`` in ``range(ways)``; returns ``self``."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(texts) != len(labels) or len(texts) == 0:
            raise ConfigError(f"The lexical classifier needs one label per text; got {len(texts)} texts and {len(labels)} labels.")
        if labels.min() < 0 or labels.max() >= ways:
            raise ConfigError(f"Labels must lie in 0..{ways - 1}; got {labels.min().item()}..{labels.max().item()}.")
        if len(labels.unique()) < 2:
            raise ConfigError("The lexical classifier needs examples of at least two labels; add examples of another label.")
        texts = list(texts)
        candidates = [TfidfVectorizer(analyzer="char_wb", ngram_range=self.char_ngrams, sublinear_tf=True),
                      TfidfVectorizer(analyzer="word", ngram_range=self.word_ngrams, sublinear_tf=True)]
        self.vectorizers = [v for v in candidates if _fits(v, texts)]  # e.g. no word of 2+ letters: characters only
        if not self.vectorizers:
            raise ConfigError("The lexical classifier found no character n-grams in the support texts; "
                              "give texts with words, or leave the lexical weight at 0.")
        self.ways = ways
        with warnings.catch_warnings():  # one shot per label is the few-shot norm, not a regression target
            warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
            self.model = LogisticRegression(C=self.c, max_iter=self.max_iter).fit(self._features(texts), labels.numpy())
        return self

    def log_probs(self, texts: Sequence[str]) -> torch.Tensor:
        """``[Q, ways]`` log-probabilities; a class absent from the support gets a large negative value."""
        if not self.ways:
            raise ConfigError("The lexical classifier was used before fit(); call fit(texts, labels, ways) first.")
        out = torch.full((len(texts), self.ways), -1e4)
        if len(texts):
            fitted = torch.as_tensor(self.model.predict_log_proba(self._features(list(texts))), dtype=torch.float32)
            out[:, torch.as_tensor(self.model.classes_, dtype=torch.long)] = fitted
        return out

    def _features(self, texts: list[str]):
        from scipy.sparse import hstack

        return hstack([v.transform(texts) for v in self.vectorizers]).tocsr()


def _fits(vectorizer, texts: list[str]) -> bool:
    """Fit ``vectorizer`` in place; False when the texts give it an empty vocabulary."""
    try:
        vectorizer.fit(texts)
    except ValueError:  # scikit-learn: "empty vocabulary"
        return False
    return True


def combine_log_probs(embedding_log_probs: torch.Tensor, lexical_log_probs: torch.Tensor, weight: float) -> torch.Tensor:
    """``[Q, ways]`` scores ``log p_embedding + weight · log p_lexical`` (a weighted product of experts)."""
    if embedding_log_probs.shape != lexical_log_probs.shape:
        raise ConfigError(f"Cannot combine scores of shapes {tuple(embedding_log_probs.shape)} and {tuple(lexical_log_probs.shape)}.")
    return embedding_log_probs + weight * lexical_log_probs
