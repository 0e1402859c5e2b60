"""`data.validation_fraction`: a validation split carved from the prepared training documents, seeded and (for
classification) stratified by label, so that evaluation during training, best_metric and early stopping never
see the test set (`data.eval`, or the `eval_fraction` hold-out), which is scored once, on the export, at the end.

The carve is chosen at preparation (the indices of the validation documents into the training store, in
`validation.npy` beside it: part of the prepared data and of its fingerprint), so the driver's plan counts
the training documents that remain. scikit-learn's `train_test_split` makes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from launcher.data.store import TokenStore
from launcher.errors import UserError

VALIDATION_FILE = "validation.npy"


def carve(num_docs: int, fraction: float, seed: int, labels: np.ndarray | None, field: str) -> np.ndarray:
    """The sorted indices of the validation documents: `fraction` of them (rounded up), per label in the training
    set's proportions when `labels` are given, drawn by `seed`."""
    from sklearn.model_selection import train_test_split

    try:
        _, validation = train_test_split(np.arange(num_docs), test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as exc:  # too few documents of a label, or a split with no document
        raise UserError(f"{field}: {fraction} of {num_docs} training documents: {exc}") from None
    if len(validation) == num_docs or not len(validation):
        raise UserError(f"{field}: {fraction} of {num_docs} training documents leaves a split empty")
    return np.sort(validation)


def has_validation(data_dir: Path) -> bool:
    return (data_dir / VALIDATION_FILE).is_file()


class StoreView:
    """Some documents of a `TokenStore`, renumbered 0..n-1: what the fine-tuning datasets read."""

    def __init__(self, store: TokenStore, indices: np.ndarray) -> None:
        self.store, self.indices = store, np.asarray(indices, dtype=np.int64)

    @property
    def num_docs(self) -> int:
        return len(self.indices)

    @property
    def has_labels(self) -> bool:
        return self.store.has_labels

    @property
    def has_token_labels(self) -> bool:
        return self.store.has_token_labels

    @property
    def labels(self) -> np.ndarray | None:
        labels = self.store.labels
        return None if labels is None else labels[self.indices]

    def doc(self, index: int) -> np.ndarray:
        return self.store.doc(int(self.indices[index]))

    def label(self, index: int) -> int:
        return self.store.label(int(self.indices[index]))

    def token_labels(self, index: int) -> np.ndarray:
        return self.store.token_labels(int(self.indices[index]))

    def doc_lengths(self) -> np.ndarray:
        return self.store.doc_lengths()[self.indices]


def document_split(data_dir: Path, split: str) -> TokenStore | StoreView:
    """The documents of `split` for a classification task: with a validation carve, `train` is the rest of the
    training store, `eval` the carve and `test` the prepared eval split; without one, the prepared split."""
    if not has_validation(data_dir):
        return TokenStore.read(data_dir, split)
    if split == "test":
        return TokenStore.read(data_dir, "eval")
    train = TokenStore.read(data_dir, "train")
    validation = np.load(data_dir / VALIDATION_FILE)
    if split == "eval":
        return StoreView(train, validation)
    return StoreView(train, np.setdiff1d(np.arange(train.num_docs), validation, assume_unique=True))
