"""The frozen CLIP teacher: an open_clip model, its own image statistics, and its text embeddings.

The student's batches are re-normalised into the teacher's mean/std (CLIP's differ from ImageNet's);
the released RISE code fed ImageNet-normalised tensors to CLIP, a defect we do not copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rise_edge.config import TeacherConfig
from rise_edge.data.transforms import Preprocessing
from rise_edge.errors import UserError, missing_extra
from rise_edge.files import cache_key
from rise_edge.registry import BUILT_TEACHERS, built_teacher, register_teacher  # noqa: F401


@dataclass(frozen=True)
class TextEmbeddings:
    """What RISE needs from the text tower, computed once (no gradient).

    raw_prototypes u (C, D): mean of the raw template embeddings of each class.
    prototypes t (C, D): u L2-normalised (the zero-shot classifier and the AD targets).
    anchors e (C, A, D): raw embeddings of "a {anchor} of a {class}".
    """

    raw_prototypes: torch.Tensor
    prototypes: torch.Tensor
    anchors: torch.Tensor

    def to(self, device: torch.device | str) -> TextEmbeddings:
        return TextEmbeddings(self.raw_prototypes.to(device), self.prototypes.to(device),
                              self.anchors.to(device))


def class_prompt_name(class_name: str, verbatim: bool = False) -> str:
    """Folder names use underscores; prompts want words ("Alarm_Clock" -> "Alarm Clock"). verbatim:
    the name as it is (teacher.prompt_names: verbatim, the released code's behaviour)."""
    return class_name if verbatim else class_name.replace("_", " ")


def template_mean_embeddings(encode_texts: Callable[[list[str]], torch.Tensor], classes: Sequence[str],
                             templates: Sequence[str], verbatim: bool = False) -> torch.Tensor:
    """(C, D) raw text embeddings of "template.format(class)" averaged over the templates, per class.

    `encode_texts` maps N prompts to (N, D) raw embeddings. L2-normalised, these are the zero-shot
    classifier RISE's teacher logits use.
    """
    prompts = [t.format(class_prompt_name(c, verbatim)) for c in classes for t in templates]
    return encode_texts(prompts).view(len(classes), len(templates), -1).mean(dim=1)


class ClipTeacher(nn.Module):
    """Frozen open_clip model with the affine map from student-normalised to teacher-normalised pixels."""

    def __init__(self, model: nn.Module, tokenizer: Callable, image_size: int,
                 mean: Sequence[float], std: Sequence[float], identity: str, *,
                 own_statistics: bool = True, logit_scale: float = 0.0):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.identity = identity  # model, weights and their size: part of every cache key
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # teacher.logit_scale: 0 takes the model's own (100 for CLIP, the released code's constant).
        self.logit_scale = logit_scale or float(model.logit_scale.exp().item())
        # teacher.input_statistics: False feeds the student-normalised tensor as it is (the released
        # code's behaviour); True re-normalises it into the teacher's own statistics.
        self.own_statistics = own_statistics
        self.weights_files: tuple[Path, ...] = ()  # set by load_teacher where weights are files

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, student: Preprocessing) -> torch.Tensor:
        """(B, 3, H, W) student-normalised -> (B, D) L2-normalised teacher image embeddings (fp32)."""
        s_mean = torch.tensor(student.mean, device=images.device).view(1, 3, 1, 1)
        s_std = torch.tensor(student.std, device=images.device).view(1, 3, 1, 1)
        pixels = images.float() * s_std + s_mean
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False, antialias=True)
        normalised = (pixels - self.mean) / self.std if self.own_statistics else (pixels - s_mean) / s_std
        teacher_input = normalised.to(self.dtype)
        return F.normalize(self.model.encode_image(teacher_input).float(), dim=-1)

    @torch.no_grad()
    def zero_shot_logits(self, images: torch.Tensor, student: Preprocessing,
                         prototypes: torch.Tensor) -> torch.Tensor:
        """q = logit_scale * normalize(E_image(x)) @ T^T: (B, C)."""
        return self.logit_scale * self.encode_images(images, student) @ prototypes.t()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch: int = 256) -> torch.Tensor:
        """Raw (unnormalised) text embeddings (N, D) in fp32."""
        out = []
        for i in range(0, len(texts), batch):
            tokens = self.tokenizer(list(texts[i:i + batch])).to(self.mean.device)
            out.append(self.model.encode_text(tokens).float())
        return torch.cat(out)

    def text_embeddings(self, classes: Sequence[str], templates: Sequence[str],
                        anchors: Sequence[str], verbatim: bool = False) -> TextEmbeddings:
        """Class prototypes from the templates and the anchors' embeddings; verbatim: class names
        and anchors as written (underscores kept), else as words."""
        raw = template_mean_embeddings(self.encode_texts, classes, templates, verbatim)
        names = [class_prompt_name(c, verbatim) for c in classes]
        anchor_texts = [f"a {class_prompt_name(a, verbatim)} of a {n}" for n in names for a in anchors]
        anchor_emb = self.encode_texts(anchor_texts).view(len(names), len(anchors), -1)
        return TextEmbeddings(raw, F.normalize(raw, dim=-1), anchor_emb)


def text_embeddings_cached(teacher: ClipTeacher, classes: Sequence[str], templates: Sequence[str],
                           anchors: Sequence[str], folders: Sequence[Path],
                           verbatim: bool = False) -> TextEmbeddings:
    """Text embeddings from the first folder holding them under their key, else computed and stored in all.

    The key covers teacher identity, templates, class names and anchors, so a resumed run (run dir)
    or another target of the same data set (shared cache) reuses them, and any change recomputes.
    """
    from rise_edge.run_dir import save_tensors

    key_data = {"teacher": teacher.identity, "templates": list(templates), "classes": list(classes),
                "anchors": list(anchors)}
    if verbatim:  # only then, so the keys of embeddings cached before the option stay valid
        key_data["prompt_names"] = "verbatim"
    key = cache_key(**key_data)[:16]
    for folder in folders:
        path = folder / f"text-{key}.safetensors"
        if path.is_file():
            return _read_text_embeddings(path, len(classes), len(anchors), _embed_dim(teacher))
    emb = teacher.text_embeddings(classes, templates, anchors, verbatim)
    for folder in folders:
        save_tensors(folder / f"text-{key}.safetensors",
                     {"raw_prototypes": emb.raw_prototypes, "prototypes": emb.prototypes,
                      "anchors": emb.anchors}, key_data)
    return emb


def _embed_dim(teacher: ClipTeacher) -> int | None:
    """The width of the teacher's joint embedding, where its model says (open_clip's CLIP and
    CustomTextCLIP do), else None."""
    model = teacher.model
    for owner in (model, getattr(model, "text", None)):
        projection = getattr(owner, "text_projection", None)
        if isinstance(projection, torch.Tensor) and projection.dim() == 2:
            return int(projection.shape[1])
    width = getattr(getattr(model, "visual", None), "output_dim", None)
    return width if isinstance(width, int) else None


def _read_text_embeddings(path: Path, classes: int, anchors: int, dim: int | None
                          ) -> TextEmbeddings:
    """Cached text embeddings, checked to be whole and of this teacher's and classes' shapes."""
    from rise_edge.errors import DamagedFile
    from rise_edge.files import read_safetensors

    fix = f"delete {path}: it is computed again from the teacher"
    t, _ = read_safetensors(path, fix, finite=True, expect={
        "raw_prototypes": (classes, dim), "prototypes": (classes, dim),
        "anchors": (classes, anchors, dim)})
    widths = {t["raw_prototypes"].shape[1], t["prototypes"].shape[1], t["anchors"].shape[2]}
    if len(widths) != 1:
        raise DamagedFile(f"{path}: its tensors disagree on the embedding width ({sorted(widths)}); "
                          f"{fix}")
    return TextEmbeddings(t["raw_prototypes"], t["prototypes"], t["anchors"])


# ---------------------------------------------------------------------------------------------------
# Loading


def _precision(cfg: TeacherConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "fp16" if device.type == "cuda" else "fp32"


def _hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cached_weights(model: str, tag: str) -> tuple[Path | None, str, dict]:
    """(file in the Hugging Face cache or None, what was looked for, the tag's open_clip config)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    tag_cfg = open_clip.get_pretrained_cfg(model, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise UserError(f"teacher.pretrained '{tag}' is neither a file nor an open_clip tag of "
                        f"'{model}'; tags: {', '.join(tags) or '(none)'}")
    hub = tag_cfg.get("hf_hub", "")
    # open_clip's convention: "org/model/" means the default file name, "org/model/file" one file.
    repo_id, filename = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)
    candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in candidates:
        if repo_id and name:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                return Path(found), f"{repo_id}/{name}", tag_cfg
    return None, f"{repo_id}/{' or '.join(candidates)}" if repo_id else tag_cfg.get("url", ""), tag_cfg


def load_teacher(cfg: TeacherConfig, device: torch.device) -> ClipTeacher:
    """The open_clip teacher: a built teacher (the demo's), an open_clip 'local-dir:' or 'hf-hub:'
    model, a model name with a local weights file, or a model name with a pretrained tag.

    Nothing is downloaded when the weights are cached, so a machine that fetched them once works
    offline; when they are neither cached nor downloadable the error says what was looked for where.
    """
    try:
        import open_clip
    except ImportError:
        raise missing_extra("open_clip_torch", "cpu", "the CLIP teacher") from None
    precision = _precision(cfg, device)
    name, weights, identity, kwargs = _weight_source(cfg)
    model = _create_model(open_clip, cfg, name, weights, precision=precision, device=device,
                          **kwargs)
    pre = open_clip.get_model_preprocess_cfg(model)
    size = pre.get("size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    teacher = ClipTeacher(model, open_clip.get_tokenizer(name), size,
                          pre.get("mean", open_clip.OPENAI_DATASET_MEAN),
                          pre.get("std", open_clip.OPENAI_DATASET_STD), identity,
                          own_statistics=cfg.input_statistics == "teacher",
                          logit_scale=cfg.logit_scale)
    # What the teacher-view cache hashes as the teacher's weights (rise_edge.train.teacher_cache):
    # its files, where it has them, so the hash does not depend on the precision it runs in.
    if name.startswith("local-dir:"):
        folder = Path(name.split(":", 1)[1]).expanduser()
        teacher.weights_files = tuple(sorted(p for p in folder.iterdir() if p.is_file()))
    elif weights:
        teacher.weights_files = (Path(str(weights)),)
    return teacher.to(device)


def _create_model(open_clip: Any, cfg: TeacherConfig, name: str, weights: str | Path,
                  **kwargs: Any) -> nn.Module:
    """open_clip's model with its weights, or one line: a weights file that is cut short, damaged
    or holds another model's tensors is named (DamagedFile), never a traceback from the loader."""
    from rise_edge.errors import DamagedFile
    from rise_edge.files import check_safetensors

    folder = Path(name.split(":", 1)[1]).expanduser() if name.startswith("local-dir:") else None
    files = ([Path(str(weights))] if weights else
             sorted(p for p in folder.iterdir() if p.is_file()) if folder else [])
    fix = (f"fetch the weights of teacher {cfg.model} again (or point teacher.pretrained at the "
           "right file)")
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path, fix)  # the header only: a cut file is named before loading
    try:
        return open_clip.create_model(name, pretrained=str(weights) or None, **kwargs)
    except Exception as exc:  # the loaders raise many types for files that are not these weights
        text = " ".join(str(exc).split())
        text = text if len(text) <= 160 else text[:157] + "..."  # the first names say enough
        where = ", ".join(str(p) for p in files if p.suffix in (".safetensors", ".bin", ".pt",
                                                                  ".pth"))
        if where and not isinstance(exc, FileNotFoundError):
            raise DamagedFile(f"could not load teacher {cfg.model} from {where} "
                              f"({type(exc).__name__}: {text}): the file is damaged or holds "
                              f"another model's weights; {fix}") from None
        raise UserError(f"could not build teacher {cfg.model} from {weights or 'random weights'}: "
                        f"{text}") from None


def _weight_source(cfg: TeacherConfig) -> tuple[str, str | Path, str, dict[str, Any]]:
    """Where the teacher's config and weights come from: (open_clip model name, weights file or ""
    when open_clip finds them itself, an identity that keys the text-embedding cache, extra
    create_model arguments). Raises a UserError that says what was looked for where."""
    import open_clip

    kwargs: dict[str, Any] = {}
    name = cfg.model
    build = built_teacher(name)
    if build is not None:
        # A teacher that is built (the demo's, a plugin's): an open_clip 'local-dir:' folder.
        name = f"local-dir:{build()}"
    if name.startswith("local-dir:"):
        folder = Path(name.split(":", 1)[1]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"teacher.model '{cfg.model}': {folder} holds no open_clip_config.json")
        # open_clip finds config and weights in the folder
        return name, "", f"{name}|{sum(_file_size(p) for p in folder.iterdir())}", kwargs
    if name.startswith("hf-hub:"):
        return name, "", name, kwargs  # config and weights from the hub repo (or its cache)
    if Path(cfg.pretrained).expanduser().is_file():
        weights: str | Path = Path(cfg.pretrained).expanduser()
    elif cfg.pretrained == "none":
        weights = ""  # random weights: tests and smoke runs only
    else:
        if cfg.model not in open_clip.list_models():
            raise UserError(f"teacher.model '{cfg.model}' is not an open_clip model; "
                            f"e.g. ViT-B-16, ViT-B-32, ViT-L-14")
        cached, looked_for, tag_cfg = _cached_weights(cfg.model, cfg.pretrained)
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        kwargs["force_preprocess_cfg"] = {k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg}
        if cached is not None:
            weights = cached
        else:
            try:
                weights = open_clip.download_pretrained(tag_cfg)
            except Exception as exc:
                raise UserError(
                    f"CLIP weights for teacher {cfg.model} / {cfg.pretrained} not found: looked for "
                    f"{looked_for} in the Hugging Face cache {_hf_cache_dir()} and could not download "
                    f"them ({type(exc).__name__}). Fetch them once on a machine with network "
                    f"(open_clip.create_model('{cfg.model}', pretrained='{cfg.pretrained}')) and copy "
                    "the cache, or set teacher.pretrained to a local weights file.") from None
    return name, weights, f"{name}|{Path(str(weights)).name}|{_file_size(weights)}", kwargs


def _file_size(path: str | Path) -> int:
    return Path(path).stat().st_size if path and Path(path).is_file() else 0
