"""Training methods by name (`loss.method`): what each loads and which objective it trains with.

    erm   cross-entropy on the labels; no teacher (w_ce only scales the lr)  (the DG baseline)
    kd    Hinton's distillation from the teacher's zero-shot logits + CE;   (RISE's main comparison)
          plain linear head, no language terms
    rise  KD + the language-guided distances (AD + RD) + CE, with the      (Huang et al., ICCV 2023)
          head projecting into CLIP's space and initialised from the class text

A method uses the loss weights it knows (erm: w_ce; kd: w_ce, w_kd, tau; rise: all) and ignores the
others, so `--set loss.method=kd` turns any RISE recipe into its KD baseline. The objectives
themselves live in rise_edge.train.objectives; this module only names them (and imports nothing heavy, so the
recipe checker can list the names).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from rise_edge.config import Recipe
    from rise_edge.train.teacher import ClipTeacher, TextEmbeddings

# (loss config, teacher or None, text embeddings or None, student preprocessing) -> objective module
ObjectiveBuilder = Callable[..., "nn.Module"]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    uses_teacher: bool   # loads the CLIP teacher and embeds the class prompts
    text_head: bool      # student head projects into CLIP's space, classifier initialised from text
    objective: ObjectiveBuilder


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a training method under its name (a name already taken is an error, not a replacement)."""
    if method.name in METHODS:
        raise ValueError(f"training method '{method.name}' is already registered")
    METHODS[method.name] = method
    return method


def method_of(recipe: Recipe) -> Method:
    """The registered method a recipe names (loss.method), or a UserError listing the methods."""
    import difflib

    from rise_edge.errors import UserError
    from rise_edge.plugins import load_plugins

    load_plugins()
    name = recipe.method
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        raise UserError(f"loss.method '{name}' is not a training method"
                        + (f"; did you mean '{close[0]}'?" if close else "")
                        + f"; methods: {', '.join(METHODS)}")
    return METHODS[name]


def _erm(cfg: Any, teacher: Any, text: Any, pre: Any) -> nn.Module:
    from rise_edge.train.objectives import ErmObjective
    return ErmObjective()


def _kd(cfg: Any, teacher: Any, text: Any, pre: Any) -> nn.Module:
    from rise_edge.train.objectives import KdObjective
    return KdObjective(cfg, teacher, text, pre)


def _rise(cfg: Any, teacher: Any, text: Any, pre: Any) -> nn.Module:
    from rise_edge.train.objectives import RiseObjective
    return RiseObjective(cfg, teacher, text, pre)


def teacher_and_text(recipe: Recipe, classes: Sequence[str], anchors: Sequence[str],
                     folders: Sequence[Path], device: torch.device
                     ) -> tuple[ClipTeacher, TextEmbeddings]:
    """The recipe's teacher and its embeddings of the class prompts and anchors (cached in
    `folders`, first hit wins), on `device`: what every teacher-using method needs."""
    from rise_edge.train.teacher import load_teacher, text_embeddings_cached

    teacher = load_teacher(recipe.teacher, device)
    text = text_embeddings_cached(teacher, classes, recipe.teacher.templates,
                                  recipe.teacher.anchors or anchors, list(folders)).to(device)
    return teacher, text


register_method(Method("erm", "cross-entropy on the source labels", False, False, _erm))
register_method(Method("kd", "cross-entropy + distillation from the teacher's zero-shot logits",
                       True, False, _kd))
register_method(Method("rise", "cross-entropy + distillation + language-guided distances (RISE)",
                       True, True, _rise))
