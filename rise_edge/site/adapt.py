"""Adapting a trained student to a site's unlabelled images, without labels or gradients.

    adabn  Li et al. 2017: every BatchNorm layer's running mean and variance are re-estimated on
           the site's images (a cumulative average over one pass, the model otherwise in eval
           mode); no weight changes. Known to hurt when the site's class mix differs from the
           sources' (the statistics then carry the class mix, not only the style).
    t3a    Iwasawa & Matsuo, NeurIPS 2021 (offline form): the classifier is re-fit from
           pseudo-prototypes. Each class's support starts with its classifier row; the site images
           join the support of the class the student predicts, and only the `filter_k` most
           confident (lowest-entropy) per class are kept; the new classifier row is the mean of
           the class's L2-normalised supports, normalised again; bias zero. The backbone is
           unchanged.
    none   nothing changes (so that INT8 calibrated on the site can be compared with the parent's).
    distill  the student fine-tuned against the run's teacher with source replay: it needs the
           run, its teacher and its source images, so rise_edge.site.distill runs it, not adapt().
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from rise_edge.errors import UserError
from rise_edge.train.student import Student

METHODS = ("adabn", "t3a", "none", "distill")
T3A_FILTER_K = 100  # supports kept per class (T3A's filter_K; the paper tunes it in 1..100 and all)

def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats]


@torch.no_grad()
def adabn(student: Student, batches: Callable[[], object]) -> dict[str, int]:
    """Re-estimate every BatchNorm's running statistics on the site's images (in place)."""
    layers = batchnorm_layers(student)
    if not layers:
        raise UserError("--method adabn re-estimates BatchNorm statistics, and this student has no "
                        "BatchNorm layer; use --method t3a")
    student.eval()
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the whole pass, independent of batch order
        m.train()          # only the BatchNorm layers: dropout and the rest stay in eval mode
    images = 0
    try:
        for batch in batches():
            student(batch)
            images += batch.shape[0]
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
            m.eval()
    return {"batchnorm_layers": len(layers), "images": images}


@torch.no_grad()
def classifier_inputs(student: Student, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, F) what the classifier reads: h for linear/split heads, z for 'rise'."""
    h = student.backbone(images)
    return student.projector(h) if student.head_spec.kind == "rise" else h


@torch.no_grad()
def t3a(student: Student, batches: Callable[[], object], filter_k: int = T3A_FILTER_K
        ) -> dict[str, object]:
    """Re-fit the classifier from the site's pseudo-prototypes (in place)."""
    student.eval()
    features, logits = [], []
    for batch in batches():
        f = classifier_inputs(student, batch)
        features.append(f)
        logits.append(student.classifier(f))
    z = nn.functional.normalize(torch.cat(features).float(), dim=1)
    out = torch.cat(logits).float()
    p = out.softmax(dim=1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1)
    predicted = out.argmax(dim=1)
    weight = student.classifier.weight.float()
    classes = weight.shape[0]
    rows, kept = [], []
    for c in range(classes):
        members = (predicted == c).nonzero().flatten()
        members = members[entropy[members].argsort()[:filter_k]]
        support = torch.cat([nn.functional.normalize(weight[c:c + 1], dim=1), z[members]])
        rows.append(nn.functional.normalize(support.mean(dim=0), dim=0))
        kept.append(int(members.numel()))
    new = torch.stack(rows)
    # The scale of the old rows, so that the softmax stays about as sharp as it was
    scale = weight.norm(dim=1).mean()
    student.classifier.weight.copy_((new * scale).to(student.classifier.weight.dtype))
    if student.classifier.bias is not None:
        student.classifier.bias.zero_()
    return {"images": int(z.shape[0]), "filter_k": filter_k, "supports_per_class": kept}


def adapt(student: Student, method: str, batches: Callable[[], object]) -> dict[str, object]:
    """Apply `method` (one of METHODS) to `student` in place; what it did, for adapt.json. The pass
    runs channels-last (several times faster on CPUs for these students); the student is left in
    the contiguous layout it is saved in."""
    if method not in METHODS:
        raise UserError(f"--method {method}: choose one of {', '.join(METHODS)}")
    if method == "none":
        return {"method": method}
    if method == "distill":  # a caller's mistake, not a user's: distill needs the whole run
        raise ValueError("distill runs through rise_edge.site.distill.distill, not adapt()")

    def channels_last() -> object:
        return (b.contiguous(memory_format=torch.channels_last) for b in batches())

    student.to(memory_format=torch.channels_last)
    try:
        done = adabn(student, channels_last) if method == "adabn" else t3a(student, channels_last)
    finally:
        student.to(memory_format=torch.contiguous_format)
    return {"method": method, **done}


def path_batches(paths: Sequence[str], decode: Callable[[Sequence[str]], np.ndarray],
                 batch: int = 64) -> Callable[[], object]:
    """A re-iterable of (B, 3, S, S) float tensors decoded about `batch` images at a time (a site of
    any size is never held in memory whole). The chunks are balanced, so none is a single image
    unless the site is: BatchNorm cannot take the statistics of one value per channel."""
    chunks = max(1, -(-len(paths) // batch))
    size = -(-len(paths) // chunks)

    def make():
        for start in range(0, len(paths), size):
            yield torch.from_numpy(decode(paths[start:start + size]))
    return make
