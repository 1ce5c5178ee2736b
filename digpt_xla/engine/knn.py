"""kNN accuracy of an encoder's frozen features (cosine similarity, temperature-weighted vote)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def extract_features(model, dataset: Dataset, batch_size: int = 256, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """(N, D) features from ``model.forward_features`` (on the model's device) and (N,) labels, on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        feats.append(model.forward_features(batch["images"].to(device)).float().cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_classify(
    ref_feats: Tensor, ref_labels: Tensor, query_feats: Tensor, k: int = 20, temperature: float = 0.07
) -> Tensor:
    """Labels of the queries by a vote of their k most cosine-similar references, each weighted by
    exp(similarity / temperature) (the weighted kNN of DINO and InstDisc)."""
    ref = F.normalize(ref_feats.float(), dim=1)
    num_classes = int(ref_labels.max()) + 1
    preds = []
    for chunk in F.normalize(query_feats.float(), dim=1).split(1024):
        sim, idx = (chunk @ ref.T).topk(min(k, len(ref)), dim=1)
        votes = torch.zeros(len(chunk), num_classes).scatter_add_(1, ref_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(model, ref_set: Dataset, query_set: Dataset, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 (%) of kNN on ``query_set`` with ``ref_set`` as the labelled memory."""
    ref_f, ref_y = extract_features(model, ref_set)
    q_f, q_y = extract_features(model, query_set)
    return 100.0 * (knn_classify(ref_f, ref_y, q_f, k, temperature) == q_y).float().mean().item()
