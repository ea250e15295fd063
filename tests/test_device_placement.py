"""Device placement, checked on a machine without a GPU: no tensor made on the default device (the
CPU) meets the model's tensors inside code that runs on the training device.

On a CUDA machine such a tensor fails the op it meets: QAT once failed at its first step because a
zero point made with `torch.zeros(())` stayed on the CPU beside a CUDA activation. A CPU-only test
never sees that, since there every device is the CPU. So `Placement` follows where each tensor
would be on a GPU machine, the CPU computing both: a tensor is on the device when it is a placed
module's, when it was moved with `.to(device)`, or when it was computed from one; it is on the
default device when a factory made it without `device=` (or it was made from numpy or bytes, or
moved with `.cpu()`), or when it was computed from such tensors only. An op that takes both is
recorded, with where the stray tensor was made. Tensors made with `device=` are not followed: which
device was named cannot be told when the stand-in is the CPU (the data pipeline names the CPU so).

Stricter than CUDA in one way: CUDA accepts a 0-dim CPU tensor in most element-wise ops, and this
check does not, because some ops (fake quantization among them) refuse it and a tensor made without
`device=` in device code is one edit away from the failing kind.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from conftest import tiny_recipe_overrides

_TORCH_DIR = str(Path(torch.__file__).parent)
_HERE = str(Path(__file__))
_REPO = Path(__file__).resolve().parents[1]
_CHECK_FUNCTIONS = frozenset({"__torch_function__", "_kind_of_result", "_site"})
DEVICE = torch.device("cpu")  # stands for the accelerator: the code is told to run here


class Placement(TorchFunctionMode):
    """Follows every tensor made or computed through torch's Python interface while active and
    records each op that mixes the device's tensors with the default device's (`found`)."""

    # Functions that make a tensor from nothing but numbers, shapes or host memory.
    FACTORIES = frozenset({"zeros", "ones", "empty", "full", "tensor", "as_tensor", "asarray",
                           "arange", "rand", "randn", "randint", "randperm", "eye", "linspace",
                           "logspace", "scalar_tensor", "empty_strided", "from_numpy", "frombuffer"})
    # What moves a tensor between devices, or reads or writes across them, legitimately (indexing
    # a device tensor with CPU indices included; __getitem__ of a default one is checked apart).
    CROSSING = frozenset({"to", "cuda", "cpu", "copy_", "__get__", "__set__", "__setitem__",
                          "_has_compatible_shallow_copy_type"})

    def __init__(self, *placed: nn.Module) -> None:
        super().__init__()
        self.found: list[str] = []
        self._tags: dict[int, tuple[weakref.ref, str, str]] = {}  # id -> (tensor, kind, made at)
        for module in placed:
            for tensor in [*module.parameters(), *module.buffers()]:
                self._set(tensor, "device", "")

    def _get(self, tensor: torch.Tensor) -> tuple[str, str] | None:
        entry = self._tags.get(id(tensor))
        return entry[1:] if entry is not None and entry[0]() is tensor else None

    def _set(self, tensor: torch.Tensor, kind: str, made_at: str) -> None:
        self._tags[id(tensor)] = (weakref.ref(tensor), kind, made_at)

    def __torch_function__(self, func: Callable[..., Any], types: tuple[type, ...],
                           args: tuple = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        leaves = _tensors((*args, *kwargs.values()))
        tags = [tag for tag in map(self._get, leaves) if tag is not None]
        on_device = any(kind == "device" for kind, _ in tags)
        stray = next((made_at for kind, made_at in tags if kind == "default"), None)
        crossing = name in self.CROSSING or (name == "__getitem__" and self._kind(args[0]) != "default")
        if on_device and stray is not None and not crossing:
            self.found.append(f"{name} at {_site()} takes a tensor on the device and one made on "
                              f"the default device at {stray}")
        result = func(*args, **kwargs)
        kind, made_at = self._kind_of_result(name, args, kwargs, leaves, on_device, stray)
        if name in ("to", "cpu", "cuda") and args and result is args[0] and kind != self._kind(args[0]):
            # A move to the device it is already on returns the tensor itself; on a GPU machine it
            # would be another tensor, and the original stays where it was: an alias stands for it.
            result = result.view_as(result)
        attribute = getattr(getattr(func, "__self__", None), "__name__", "")  # of __get__/__set__
        if name == "__set__" and attribute == "data" and len(args) == 2:
            kind, made_at = self._get(args[1]) or (None, "")  # `p.data = t`: p is where t is
            if kind is not None:
                self._set(args[0], kind, made_at)
            return result
        if kind is not None:
            for out in _tensors((result,)):
                # an in-place op returns its own input, which keeps its tag
                if not any(out is t for t in leaves):
                    self._set(out, kind, made_at)
        return result

    def _kind(self, tensor: torch.Tensor) -> str | None:
        tag = self._get(tensor)
        return tag[0] if tag is not None else None

    def _kind_of_result(self, name: str, args: tuple, kwargs: dict[str, Any],
                        leaves: list[torch.Tensor], on_device: bool, stray: str | None
                        ) -> tuple[str | None, str]:
        """Where the result of `name` would be: ("device" | "default" | None, where it was made)."""
        if name in ("to", "cuda") and (name == "cuda" or _names_a_device(args[1:], kwargs)):
            return "device", ""
        if name == "cpu":
            return "default", f"Tensor.cpu at {_site()}"
        if name in self.FACTORIES and not leaves:  # (a tensor argument: a copy where it is)
            if kwargs.get("device") is not None:
                return None, ""  # not followed (module docstring)
            caller = sys._getframe(2).f_globals.get("__name__", "")
            if caller.split(".")[0] == "torch" and not caller.startswith("torch.utils.data"):
                return None, ""  # torch's own bookkeeping (an optimizer's step count): its design
            return "default", f"torch.{name} at {_site()}"
        if on_device:
            return "device", ""
        return ("default", stray) if stray is not None else (None, "")


def _tensors(values: tuple) -> list[torch.Tensor]:
    """The tensors among `values` and in the lists and tuples among them (how torch's functions
    take and return tensors; a full tree walk made the check ten times slower)."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _names_a_device(args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a `Tensor.to(...)` call names a device (not only a dtype or memory format)."""
    return kwargs.get("device") is not None or any(
        isinstance(a, (torch.device, str, int)) and not isinstance(a, bool) for a in args)


def _site() -> str:
    """file:line of the innermost caller outside torch and the check (what made or mixed a tensor)."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR) or (
            frame.f_code.co_filename == _HERE and frame.f_code.co_name in _CHECK_FUNCTIONS)):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = Path(frame.f_code.co_filename)
    short = path.relative_to(_REPO) if path.is_relative_to(_REPO) else Path(*path.parts[-3:])
    return f"{short.as_posix()}:{frame.f_lineno}"


# ---------------------------------------------------------------------------------------------------
# The code that runs on the training device


def test_the_check_finds_tensors_left_on_the_default_device_and_only_those() -> None:
    """The check itself: the QAT defect (a zero point made by torch.zeros(()) meeting an activation
    on the device), a batch never moved and a host copy meeting the device are found; the fixed
    zero point, and a device tensor used after a host copy was taken of it, are not."""
    weight = nn.Linear(2, 2)
    x = torch.ones(3, 2)
    with Placement(weight) as placement:
        activation = weight(x.to(DEVICE))
        zero = torch.zeros((), dtype=torch.int32)
        torch.fake_quantize_per_tensor_affine(activation, torch.tensor(0.1, device=DEVICE),
                                              zero, -128, 127)
    assert len(placement.found) == 1 and "fake_quantize_per_tensor_affine" in placement.found[0]
    assert "torch.zeros at tests/test_device_placement.py" in placement.found[0]
    with Placement(weight) as placement:
        activation = weight(x.to(DEVICE))
        torch.fake_quantize_per_tensor_affine(
            activation, torch.tensor(0.1, device=activation.device),
            torch.zeros((), dtype=torch.int32, device=activation.device), -128, 127)
        activation.cpu()  # a copy on the host; the activation stays on the device
        activation + weight.bias
    assert placement.found == []
    with Placement(weight) as placement:
        batch = torch.ones(3, 2)
        weight(batch)  # the batch never moved to the device
        weight(batch.to(DEVICE)).cpu() + weight.bias  # the copy on the host meets the device
    assert [f.split(" at ")[0] for f in placement.found] == ["linear", "add"]


def test_qat_calibration_and_fake_quant_steps_keep_their_tensors_on_the_device(
        tiny_run: Path) -> None:
    """INT8 calibration, the fake-quantized forward and backward passes, the QAT optimizer step and
    its scoring: QAT as export runs it, told to run on the device (QAT on a CUDA machine once
    failed at its first step: a CPU zero point beside a CUDA activation)."""
    from rise_edge.config import ExportConfig
    from rise_edge.export.fake_quant import quantizers
    from rise_edge.export.qat import qat_finetune
    from rise_edge.export.session import ExportSession
    from rise_edge.run_dir import open_run

    session = ExportSession(open_run(tiny_run), ExportConfig(calibration_size=8), lambda _: None)
    for objective in ("fp32", "run"):  # distillation from the FP32 student; the run's own loss
        with Placement() as placement:
            result = qat_finetune(session.run, session.splits,
                                  ExportConfig(qat_steps=1, qat_eval_every=1, qat_batch_size=8,
                                               qat_objective=objective),
                                  session.calibration_images, tiny_run / f"qat-{objective}",
                                  {"test": objective}, lambda _: None, device=DEVICE)
        assert placement.found == [], objective
        assert [h["step"] for h in result.history] == [0, 1]
        assert all(float(q.amax) > 0 for q in quantizers(result.model))  # calibrated


def _rise_recipe(data_root: Path, clip_dir: Path, tmp_path: Path, cache: str) -> Any:
    """A one-step RISE recipe (CE, KD and both distances) on the tiny data and teacher, told to
    train on the device, with the teacher-view cache `cache` (2 views per image) under tmp_path."""
    from rise_edge.config import load_recipe

    return load_recipe(None, [*tiny_recipe_overrides(data_root), "train.steps=1",
                              "train.batch_size=8", "train.device=cpu", "student.model=test_convnext",
                              f"teacher.model=local-dir:{clip_dir}", "loss.w_ce=0.2", "loss.w_kd=0.8",
                              "loss.w_dist=1.0", f"teacher.cache={cache}", "teacher.cache_views=2",
                              f"teacher.cache_dir={tmp_path / 'views'}"])


@pytest.mark.parametrize("cache", ["on", "off"])
def test_a_rise_training_step_keeps_its_tensors_on_the_device(
        cache: str, tiny_data_root: Path, tiny_clip_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One RISE training step (CE, KD, both distances) as `rise-edge train` runs it on the device,
    with its evaluation and selection; with the teacher-view cache on, the fill of the cache
    (the teacher embedding every view), its verification and the step reading it; off, the
    teacher's forward pass inside the step."""
    from rise_edge.train.loop import train_run

    monkeypatch.setenv("RISE_EDGE_CACHE", str(tmp_path / "cache"))
    recipe = _rise_recipe(tiny_data_root, tiny_clip_dir, tmp_path, cache)
    with Placement() as placement:
        result = train_run(recipe, run_dir=tmp_path / "run", progress=False)
    assert placement.found == []
    views = result.stats["views"]
    if cache == "on":  # filled by this run, then read by its step
        assert views["cache"] == "used" and views["filled"]["images"] > 0
    else:
        assert views["cache"] == "off" and views["teacher_s"] > 0


def test_a_sweeps_teacher_cache_fill_keeps_its_tensors_on_the_device(
        tiny_data_root: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    """The fill a sweep (or `rise-edge teacher-cache build`) runs before its runs, on its device."""
    from rise_edge.train.cache_build import caches_for

    recipe = _rise_recipe(tiny_data_root, tiny_clip_dir, tmp_path, "auto")
    with Placement() as placement:
        records = caches_for([recipe], fill=True, log=lambda _: None)
    assert placement.found == []
    assert len(records) == 1 and records[0]["filled"]["images"] == records[0]["images"] > 0
