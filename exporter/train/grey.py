"""The grey step of a model of grey images, one definition for the graph a bundle serves and for its fit.

A model that learned grey images only cannot judge colour, so its graph turns every frame grey first; its bank (or
student) must be fitted on the same grey pixels, or a coloured mark in the training images is learned as colour and
served as an unseen grey one."""

from __future__ import annotations

import torch
from torch import nn

from bundle import InputSpec

GREY_STEP = ("grey on every channel (BT.601's luma in 256ths: 77 R + 150 G + 29 B), as a 1x1 convolution of the "
             "normalised channels: the training images were all grey")
GREY_WEIGHTS = (77 / 256, 150 / 256, 29 / 256)  # R, G, B: they sum to exactly 1, so a grey picture stays as it was


class GreyFirst(nn.Module):
    """``graph`` fed its images grey.  Its input is RGB normalised by ``spec``'s mean and std, where the luma of the
    raw channels is affine: one 1x1 convolution, which costs a fraction of what the same steps in the image's NHWC
    layout before the normalisation cost (OpenVINO then no longer folds that normalisation into one pass)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, graph: nn.Module, spec: InputSpec) -> None:
        super().__init__()
        self.inner = graph  # not "graph": a traced module has its own attribute of that name
        w, mean, std = torch.tensor(GREY_WEIGHTS), torch.tensor(spec.mean), torch.tensor(spec.std)
        # raw_k = 255 (std_k x_k + mean_k); luma = sum_k w_k raw_k; out_c = (luma / 255 - mean_c) / std_c
        self.register_buffer("weight", ((w * std)[None, :] / std[:, None])[:, :, None, None])
        self.register_buffer("bias", ((w * mean).sum() - mean) / std)

    def forward(self, image: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inner(nn.functional.conv2d(image, self.weight, self.bias), *rest)


def as_served(graph: nn.Module, spec: InputSpec) -> nn.Module:
    """The torch graph as its bundle serves it: its images turned grey first where ``spec`` says so."""
    return GreyFirst(graph, spec) if GREY_STEP in spec.in_graph else graph


def as_fitted(batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """A normalised RGB batch as the served graph's network sees it: grey where ``spec`` says so."""
    return GreyFirst(nn.Identity(), spec)(batch) if GREY_STEP in spec.in_graph else batch
