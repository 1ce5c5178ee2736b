"""kNN accuracy of an encoder's frozen features (cosine distance, distance-weighted vote)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def extract_features(model, dataset: Dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(N, D) features from ``model.forward_features`` and (N,) labels, on the CPU."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        feats.append(model.forward_features(batch["images"]).float())
        labels.append(batch["labels"])
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_classify(ref_feats: Tensor, ref_labels: Tensor, query_feats: Tensor, k: int = 20) -> Tensor:
    """Predicted labels of the queries by a distance-weighted vote of their k nearest references (cosine)."""
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(k, len(ref_labels)), metric="cosine", weights="distance")
    clf.fit(ref_feats.numpy(), ref_labels.numpy())
    return torch.from_numpy(clf.predict(query_feats.numpy()))


def knn_accuracy(model, ref_set: Dataset, query_set: Dataset, k: int = 20) -> float:
    """Top-1 (%) of kNN on ``query_set`` with ``ref_set`` as the labelled memory."""
    ref_f, ref_y = extract_features(model, ref_set)
    q_f, q_y = extract_features(model, query_set)
    return 100.0 * (knn_classify(ref_f, ref_y, q_f, k) == q_y).float().mean().item()
