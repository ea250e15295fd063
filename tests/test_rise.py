"""RISE: each loss term against a slow literal version of its formula, invariants, and the teacher."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP

from rise_edge.config import LossConfig, TeacherConfig
from rise_edge.data.transforms import Preprocessing
from rise_edge.errors import UserError
from rise_edge.train.objectives import (RD_SCALE, ErmObjective, RiseObjective, absolute_distance,
                                        kd_loss, relative_distance)
from rise_edge.train.student import HeadSpec, Student
from rise_edge.train.teacher import (TextEmbeddings, class_prompt_name, load_teacher,
                                     text_embeddings_cached)

# ---------------------------------------------------------------------------------------------------
# Literal, per-sample versions of the formulas in the method notes.


def literal_kd(s: torch.Tensor, q: torch.Tensor, tau: float) -> float:
    total = 0.0
    for i in range(s.shape[0]):
        p_t = [math.exp(v / tau) for v in q[i].tolist()]
        p_s = [math.exp(v / tau) for v in s[i].tolist()]
        zt, zs = sum(p_t), sum(p_s)
        total += sum((a / zt) * math.log((a / zt) / (b / zs)) for a, b in zip(p_t, p_s))
    return tau**2 * total / s.shape[0]


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def literal_ad(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> float:
    return sum(1 - _cos(z[i].tolist(), t[y[i]].tolist()) for i in range(z.shape[0])) / z.shape[0]


def _softmax(values: list[float]) -> list[float]:
    e = [math.exp(v) for v in values]
    return [v / sum(e) for v in e]


def literal_rd(z: torch.Tensor, u: torch.Tensor, e: torch.Tensor, y: torch.Tensor) -> float:
    total, count = 0.0, 0
    for i in range(z.shape[0]):
        c = int(y[i])
        anchors = range(e.shape[1])
        p_t = _softmax([_cos(u[c].tolist(), e[c, a].tolist()) for a in anchors])
        p_s = _softmax([_cos(z[i].tolist(), e[c, a].tolist()) for a in anchors])
        total += sum((ps - pt) ** 2 for ps, pt in zip(p_s, p_t))
        count += len(p_t)
    return RD_SCALE * total / count


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    B, C, D, A = 6, 4, 5, 3
    return {"s": torch.randn(B, C, generator=g) * 3, "q": torch.randn(B, C, generator=g) * 3,
            "z": torch.randn(B, D, generator=g), "u": torch.randn(C, D, generator=g) * 2,
            "e": torch.randn(C, A, D, generator=g) * 2, "y": torch.tensor([0, 1, 2, 3, 1, 0])}


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_kd_matches_literal(batch, tau: float) -> None:
    assert kd_loss(batch["s"], batch["q"], tau).item() == pytest.approx(
        literal_kd(batch["s"], batch["q"], tau), rel=1e-5)


def test_absolute_distance_matches_literal(batch) -> None:
    t = F.normalize(batch["u"], dim=-1)
    assert absolute_distance(batch["z"], t, batch["y"]).item() == pytest.approx(
        literal_ad(batch["z"], t, batch["y"]), rel=1e-5)


def test_relative_distance_matches_literal(batch) -> None:
    assert relative_distance(batch["z"], batch["u"], batch["e"], batch["y"]).item() == pytest.approx(
        literal_rd(batch["z"], batch["u"], batch["e"], batch["y"]), rel=1e-5)


def test_terms_are_zero_when_the_student_equals_its_target(batch) -> None:
    y, u, e = batch["y"], batch["u"], batch["e"]
    assert kd_loss(batch["q"], batch["q"], 3.0).item() == pytest.approx(0.0, abs=1e-6)
    t = F.normalize(u, dim=-1)
    assert absolute_distance(u[y] * 2.5, t, y).item() == pytest.approx(0.0, abs=1e-6)
    assert relative_distance(u[y] * 0.3, u, e, y).item() == pytest.approx(0.0, abs=1e-9)
    # ...and positive otherwise.
    assert kd_loss(batch["s"], batch["q"], 3.0) > 0 and relative_distance(
        batch["z"], u, e, y) > 0


def _tiny_student(embed_dim: int | None, classes: int = 3, kind: str = "") -> Student:
    """kind '' : the released RISE head with a projector, a linear head without."""
    kind = kind or ("linear" if embed_dim is None else "rise")
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return Student(backbone, HeadSpec(8, classes, embed_dim, kind))


PRE = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_rise_objective_terms_weights_and_no_teacher_gradient(tiny_teacher) -> None:
    text = tiny_teacher.text_embeddings(["dog", "guitar", "house"], ["a photo of a {}."],
                                        ["sketch", "cartoon"])
    student = _tiny_student(text.prototypes.shape[1])
    student.init_classifier_from_text(text.prototypes)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    cfg = LossConfig(w_ce=0.2, w_kd=0.8, w_dist=1.5, tau=3.0)
    terms = RiseObjective(cfg, tiny_teacher, text, PRE)(student, images, labels)
    assert set(terms) == {"loss", "ce", "kd", "ad", "rd"}
    expected = 0.2 * terms["ce"] + 0.8 * terms["kd"] + 1.5 * (terms["ad"] + terms["rd"])
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # The teacher logits are exactly the zero-shot ones on the same view.
    z, logits = student(images, with_embedding=True)
    # the teacher's embedding at the teacher-view cache's precision (fp16), in both of its paths
    e = tiny_teacher.encode_images(images, PRE).to(torch.float16).float()
    q = tiny_teacher.logit_scale * e @ text.prototypes.t()
    assert terms["kd"].item() == pytest.approx(kd_loss(logits, q, 3.0).item(), rel=1e-6)
    exact = tiny_teacher.zero_shot_logits(images, PRE, text.prototypes)
    assert terms["kd"].item() == pytest.approx(kd_loss(logits, exact, 3.0).item(), rel=1e-3)
    terms["loss"].backward()
    assert all(p.grad is None for p in tiny_teacher.parameters())
    assert all(not p.requires_grad for p in tiny_teacher.parameters())
    assert student.projector.weight.grad is not None
    # Either distance can be switched off.
    off = RiseObjective(LossConfig(w_kd=0.5, w_dist=1.0, relative_distance=False), tiny_teacher,
                        text, PRE)(student, images, labels)
    assert "rd" not in off and "ad" in off


def test_erm_objective_is_cross_entropy() -> None:
    student = _tiny_student(None)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    terms = ErmObjective()(student, images, labels)
    assert terms.keys() == {"loss", "ce"}
    assert terms["loss"].item() == pytest.approx(F.cross_entropy(student(images), labels).item())


def test_kd_objective_is_ce_plus_hinton_kd_from_zero_shot_logits(tiny_teacher) -> None:
    from rise_edge.train.objectives import KdObjective

    text = tiny_teacher.text_embeddings(["dog", "guitar", "house"], ["a photo of a {}."], ["sketch"])
    student = _tiny_student(None)  # KD's head is a plain linear classifier
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    cfg = LossConfig(w_ce=0.3, w_kd=0.7, w_dist=5.0, tau=2.0)  # w_dist is RISE's: KD ignores it
    terms = KdObjective(cfg, tiny_teacher, text, PRE)(student, images, labels)
    assert terms.keys() == {"loss", "ce", "kd"}
    e = tiny_teacher.encode_images(images, PRE).to(torch.float16).float()  # the cache's precision
    q = tiny_teacher.logit_scale * e @ text.prototypes.t()
    assert terms["kd"].item() == pytest.approx(kd_loss(student(images), q, 2.0).item(), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(0.3 * terms["ce"].item() + 0.7 * terms["kd"].item(),
                                                 rel=1e-6)


def test_methods_registry_names_each_method_once() -> None:
    from rise_edge.train.methods import METHODS, Method, register_method

    assert list(METHODS) == ["erm", "kd", "rise"]
    assert [m.uses_teacher for m in METHODS.values()] == [False, True, True]
    assert [m.default_head for m in METHODS.values()] == ["linear", "linear", "split"]
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("kd", "again", True, "linear", METHODS["kd"].objective))


def test_classifier_starts_as_the_text_classifier(tiny_teacher) -> None:
    text = tiny_teacher.text_embeddings(["a", "b"], ["{}"], ["x"])
    student = _tiny_student(text.prototypes.shape[1], classes=2)
    student.init_classifier_from_text(text.prototypes)
    torch.testing.assert_close(student.classifier.weight, text.prototypes)
    assert student.projector.weight.std().item() == pytest.approx(0.01, rel=0.3)


def test_teacher_sees_its_own_statistics(tiny_teacher) -> None:
    """Student-normalised input is mapped back to pixels, then into CLIP's mean/std."""
    pixels = torch.rand(2, 3, 32, 32)
    student_pre = Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    student_input = (pixels - torch.tensor(student_pre.mean).view(1, 3, 1, 1)) / torch.tensor(
        student_pre.std).view(1, 3, 1, 1)
    clip_input = (pixels - tiny_teacher.mean) / tiny_teacher.std
    expected = F.normalize(tiny_teacher.model.encode_image(clip_input), dim=-1)
    torch.testing.assert_close(tiny_teacher.encode_images(student_input, student_pre), expected,
                               rtol=1e-4, atol=1e-5)
    assert tiny_teacher.logit_scale == pytest.approx(
        tiny_teacher.model.logit_scale.exp().item())


def test_text_embeddings_prototypes_and_anchors(tiny_teacher) -> None:
    templates = ["itap of a {}.", "art of the {}."]
    text = tiny_teacher.text_embeddings(["Alarm_Clock", "dog"], templates, ["sketch", "photo"])
    raw = tiny_teacher.encode_texts(["itap of a Alarm Clock.", "art of the Alarm Clock."]).mean(0)
    torch.testing.assert_close(text.raw_prototypes[0], raw)
    torch.testing.assert_close(text.prototypes[0], F.normalize(raw, dim=-1))
    anchor = tiny_teacher.encode_texts(["a photo of a dog"])[0]
    torch.testing.assert_close(text.anchors[1, 1], anchor)
    assert class_prompt_name("Alarm_Clock") == "Alarm Clock"
    # The released code's behaviour, one option away: names and anchors verbatim.
    verbatim = tiny_teacher.text_embeddings(["Alarm_Clock"], templates, ["art_painting"], verbatim=True)
    raw = tiny_teacher.encode_texts(["itap of a Alarm_Clock.", "art of the Alarm_Clock."]).mean(0)
    torch.testing.assert_close(verbatim.raw_prototypes[0], raw)
    torch.testing.assert_close(verbatim.anchors[0, 0],
                               tiny_teacher.encode_texts(["a art_painting of a Alarm_Clock"])[0])
    words = tiny_teacher.text_embeddings(["Alarm_Clock"], templates, ["art_painting"])
    torch.testing.assert_close(words.anchors[0, 0],
                               tiny_teacher.encode_texts(["a art painting of a Alarm Clock"])[0])


def test_teacher_fed_the_student_statistics_on_request(tiny_teacher) -> None:
    """teacher.input_statistics: student feeds the student-normalised tensor as it is (released code)."""
    student_pre = Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    student_input = torch.randn(2, 3, 32, 32)
    tiny_teacher.own_statistics = False
    try:
        fed = tiny_teacher.encode_images(student_input, student_pre)
    finally:
        tiny_teacher.own_statistics = True
    expected = F.normalize(tiny_teacher.model.encode_image(student_input), dim=-1)
    torch.testing.assert_close(fed, expected, rtol=1e-4, atol=1e-5)


def test_text_embeddings_are_cached_by_key(tiny_teacher, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    args = (["dog", "cat"], ["a {}."], ["sketch"])
    first = text_embeddings_cached(tiny_teacher, *args, [tmp_path / "run", tmp_path / "shared"])
    assert len(list((tmp_path / "shared").glob("text-*.safetensors"))) == 1

    def fail(*a, **k):
        raise AssertionError("should come from the cache")

    monkeypatch.setattr(tiny_teacher, "text_embeddings", fail)
    again = text_embeddings_cached(tiny_teacher, *args, [tmp_path / "other_run", tmp_path / "shared"])
    torch.testing.assert_close(again.anchors, first.anchors)
    monkeypatch.undo()
    text_embeddings_cached(tiny_teacher, ["dog", "cat"], ["a {}."], ["cartoon"], [tmp_path / "shared"])
    assert len(list((tmp_path / "shared").glob("text-*.safetensors"))) == 2  # new anchors, new key


def test_missing_clip_weights_say_what_was_looked_for_and_where(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants
    import open_clip

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(UserError) as info:
        load_teacher(TeacherConfig(model="ViT-B-16", pretrained="openai"), torch.device("cpu"))
    message = str(info.value)
    # Where open_clip keeps these weights depends on its version: the Hugging Face hub (its cache
    # is named) or a URL.
    source = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    looked_for = (source.get("hf_hub") or "").strip("/") or source["url"]
    assert "ViT-B-16 / openai" in message and looked_for in message
    assert "teacher.pretrained" in message
    if source.get("hf_hub"):
        assert str(tmp_path / "hf") in message
    with pytest.raises(UserError, match="neither a file nor an open_clip tag"):
        load_teacher(TeacherConfig(model="ViT-B-16", pretrained="nope"), torch.device("cpu"))
    with pytest.raises(UserError, match="not an open_clip model"):
        load_teacher(TeacherConfig(model="ViT-Q-99", pretrained="openai"), torch.device("cpu"))


def test_teacher_from_a_local_file(tiny_teacher, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_teacher.model.state_dict().items()}, str(weights))
    loaded = load_teacher(TeacherConfig(model=TINY_CLIP, pretrained=str(weights)), torch.device("cpu"))
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_images(images, PRE), tiny_teacher.encode_images(images, PRE))
    assert isinstance(loaded.text_embeddings(["a"], ["{}"], ["b"]), TextEmbeddings)


def test_teacher_runs_outside_the_students_autocast(tiny_teacher) -> None:
    """The released code runs its teacher apart from the student's mixed precision: under the
    student's bf16 autocast, the teacher's logits are still its own-precision (here fp32) ones."""
    from rise_edge.train.objectives import KdObjective

    text = tiny_teacher.text_embeddings(["a", "b", "c"], ["a photo of a {}."], ["sketch"])
    objective = KdObjective(LossConfig(w_kd=1.0), tiny_teacher, text, PRE)
    images = torch.randn(4, 3, 32, 32)
    # its own precision, then rounded to the teacher-view cache's fp16 as in both of its paths
    plain = tiny_teacher.logit_scale * tiny_teacher.encode_images(images, PRE).to(
        torch.float16).float() @ text.prototypes.t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = objective.teacher_logits(images)
        # ...where the teacher called directly would run in the student's bf16
        assert tiny_teacher.zero_shot_logits(images, PRE, text.prototypes).dtype == torch.bfloat16
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain)


def test_the_recipe_sets_the_teachers_logit_scale_and_input_statistics(tiny_teacher) -> None:
    """load_teacher applies teacher.logit_scale and teacher.input_statistics itself, so every user
    of a loaded teacher (training, QAT, benchmarks) sees the recipe's settings."""
    from rise_edge.config import TeacherConfig
    from rise_edge.train.teacher import load_teacher

    name = "rise-edge-test-clip"  # registered by the tiny_teacher fixture
    released = load_teacher(TeacherConfig(model=name, pretrained="none", logit_scale=100.0,
                                          input_statistics="student"), torch.device("cpu"))
    assert released.logit_scale == 100.0 and not released.own_statistics
    own = load_teacher(TeacherConfig(model=name, pretrained="none"), torch.device("cpu"))
    assert own.own_statistics
    assert own.logit_scale == pytest.approx(own.model.logit_scale.exp().item())
