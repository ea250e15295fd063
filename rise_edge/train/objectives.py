"""The method alone: the ERM, KD and RISE objectives and their loss terms, vectorised over the batch.
(rise_edge.train.methods names them for recipes: loss.method.)

RISE (Huang et al., ICCV 2023): L = w_kd * KD + w_ce * CE + w_dist * (AD + RD), with
  KD = tau^2 * KL(softmax(q / tau) || softmax(s / tau)), batch mean   (teacher distribution is the target)
  AD = mean_i [1 - cos(z_i, t_{y_i})]                                  (absolute distance to the class text)
  RD = 10 * mean_{i,a} (softmax_a cos(z_i, e_{y_i,a}) - softmax_a cos(u_{y_i}, e_{y_i,a}))^2
where s are student logits, z the projected student embedding, q the teacher's zero-shot logits,
t / u the normalised / raw class prototypes and e the raw anchor embeddings.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from rise_edge.config import LossConfig
from rise_edge.data.transforms import Preprocessing
from rise_edge.train.teacher import ClipTeacher, TextEmbeddings

RD_SCALE = 10.0  # the released code's factor on the relative distance


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, C), (B, C) -> scalar. Summed over classes, averaged over the batch, scaled by tau^2."""
    log_p_student = F.log_softmax(student_logits / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / tau, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * tau**2


def absolute_distance(z: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z (B, D), normalised prototypes t (C, D), labels (B,) -> mean cosine distance to the class text."""
    return (1.0 - F.cosine_similarity(z, prototypes[labels], dim=-1)).mean()


def relative_distance(z: torch.Tensor, raw_prototypes: torch.Tensor, anchors: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """z (B, D), raw prototypes u (C, D), raw anchors e (C, A, D), labels (B,) -> scalar.

    Softmax profiles over the anchors of the sample's class: the student's (cosines of z) against the
    teacher's (cosines of the class prototype u, the same for every image of the class).
    """
    class_anchors = F.normalize(anchors[labels], dim=-1)                    # (B, A, D)
    student = torch.einsum("bd,bad->ba", F.normalize(z, dim=-1), class_anchors)
    teacher_profile = torch.einsum("cd,cad->ca", F.normalize(raw_prototypes, dim=-1),
                                   F.normalize(anchors, dim=-1))            # (C, A)
    p_student = student.softmax(dim=-1)
    p_teacher = teacher_profile[labels].softmax(dim=-1)
    return RD_SCALE * (p_student - p_teacher).pow(2).mean()


class ErmObjective(nn.Module):
    """Plain cross-entropy on the source domains: the baseline every RISE result is compared with."""

    def forward(self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        logits = student(images)
        ce = F.cross_entropy(logits.float(), labels)
        return {"loss": ce, "ce": ce}


class TeacherObjective(nn.Module):
    """What KD and RISE share: the frozen teacher, its text embeddings, and its zero-shot logits on
    the student's own (re-normalised) view of the batch."""

    def __init__(self, cfg: LossConfig, teacher: ClipTeacher, text: TextEmbeddings,
                 student_preprocessing: Preprocessing):
        super().__init__()
        self.cfg = cfg
        self.teacher = teacher
        self.text = text
        self.student_preprocessing = student_preprocessing
        self.teacher_seconds = 0.0  # host time spent on the teacher's side of the loss

    def teacher_logits(self, images: torch.Tensor, embeddings: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """(B, 3, H, W) student-normalised images -> (B, C) zero-shot logits (fp32).

        `embeddings` (B, D), the teacher-view cache's L2-normalised embeddings of these very views
        (rise_edge.train.teacher_cache), replace the teacher's forward pass: the logits are
        logit_scale * e @ T^T from them and the class text, as the teacher would compute them.
        Outside the student's autocast, as the released code runs its teacher: the teacher keeps
        its own precision (teacher.precision: fp16 on CUDA by default), not the student's bf16.
        """
        started = time.perf_counter()
        with torch.autocast(images.device.type, enabled=False):
            if embeddings is None:
                # At the cache's storage precision (fp16), so that a cached run and its on-the-fly
                # twin see the same teacher: rounded in one path and not the other, the 1e-4
                # differences grew over a run into several images' worth of top-1 on the demo.
                embeddings = self.teacher.encode_images(images, self.student_preprocessing)
                embeddings = embeddings.to(torch.float16)
            logits = self.teacher.logit_scale * embeddings.float() @ self.text.prototypes.t()
        self.teacher_seconds += time.perf_counter() - started
        return logits


class KdObjective(TeacherObjective):
    """Hinton's knowledge distillation from CLIP's zero-shot logits, plus CE: RISE without the
    language terms and without the text-initialised head (the paper's main comparison)."""

    def forward(self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                teacher_embeddings: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = student(images).float()
        terms = {"ce": F.cross_entropy(logits, labels),
                 "kd": kd_loss(logits, self.teacher_logits(images, teacher_embeddings), self.cfg.tau)}
        return {"loss": self.cfg.w_ce * terms["ce"] + self.cfg.w_kd * terms["kd"], **terms}


class RiseObjective(TeacherObjective):
    """RISE: CE + distillation from CLIP's zero-shot logits + language-guided embedding distances."""

    def forward(self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                teacher_embeddings: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cfg, text = self.cfg, self.text
        z, logits = student(images, with_embedding=True)
        z, logits = z.float(), logits.float()
        terms: dict[str, torch.Tensor] = {"ce": F.cross_entropy(logits, labels)}
        total = cfg.w_ce * terms["ce"]
        if cfg.w_kd > 0:
            terms["kd"] = kd_loss(logits, self.teacher_logits(images, teacher_embeddings), cfg.tau)
            total = total + cfg.w_kd * terms["kd"]
        if cfg.w_dist > 0 and cfg.absolute_distance:
            terms["ad"] = absolute_distance(z, text.prototypes, labels)
            total = total + cfg.w_dist * terms["ad"]
        if cfg.w_dist > 0 and cfg.relative_distance:
            terms["rd"] = relative_distance(z, text.raw_prototypes, text.anchors, labels)
            total = total + cfg.w_dist * terms["rd"]
        return {"loss": total, **terms}
