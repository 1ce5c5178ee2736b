import torch

from digpt_xla.engine.knn import knn_classify


def test_knn_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 4
    labels = torch.arange(5).repeat_interleave(40)
    feats = centers[labels] + torch.randn(200, 16, generator=g)
    pred = knn_classify(feats[::2], labels[::2], feats[1::2], k=10)
    assert (pred == labels[1::2]).float().mean() > 0.95
    # and it is not blind to the features: shuffled references give chance-level accuracy
    shuffled = labels[::2][torch.randperm(100, generator=g)]
    assert (knn_classify(feats[::2], shuffled, feats[1::2], k=10) == labels[1::2]).float().mean() < 0.5
