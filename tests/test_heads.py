"""Student heads (student.head): every method trains on every head it can, the deployed graph is
image -> logits whatever the head, and the comparisons between methods are fair by construction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_CLIP_CONFIG, TINY_DATASET
from safetensors.torch import load_file

from rise_edge.cli import main
from rise_edge.train.student import HEAD_KINDS, HeadSpec, Student

EMBED = TINY_CLIP_CONFIG["embed_dim"]


def _train(data_root: Path, clip_dir: Path, run_dir: Path, recipe: Path, *sets: str):
    base = [f"data.root={data_root}", f"data.dataset={TINY_DATASET}", "data.target_domain=sketch",
            "data.val_fraction=0.25", "data.num_workers=0", "student.model=test_convnext",
            "student.image_size=32", f"teacher.model=local-dir:{clip_dir}", "loss.w_ce=0.2",
            "loss.w_kd=0.8", "loss.w_dist=1.0", "train.batch_size=8", "optim.lr=0.01",
            "train.steps=2", *sets]
    args = ["train", str(recipe), "--run-dir", str(run_dir), *[a for s in base for a in ("--set", s)]]
    return CliRunner().invoke(main, args)


def _recipe(tmp_path: Path, text: str = "{}\n") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


COMBINATIONS = [(m, h) for m in ("erm", "kd", "rise") for h in HEAD_KINDS
                if not (m == "rise" and h == "linear")]


@pytest.mark.parametrize(("method", "head"), COMBINATIONS)
def test_every_method_trains_on_every_head_it_can(method: str, head: str, tiny_teacher) -> None:
    """One optimizer step of the method's objective on the head: the loss is finite, the terms are
    the method's, and gradients reach the backbone and every head part the loss uses."""
    from rise_edge.config import LossConfig
    from rise_edge.data.transforms import Preprocessing
    from rise_edge.train.methods import METHODS

    text = tiny_teacher.text_embeddings(["a", "b", "c"], ["a photo of a {}."], ["sketch", "photo"])
    torch.manual_seed(0)
    student = Student(_tiny_backbone(), HeadSpec(8, 3, None if head == "linear" else EMBED, head))
    if head == "rise":
        student.init_classifier_from_text(text.prototypes)
    pre = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    method = METHODS[method]
    objective = method.objective(LossConfig(w_ce=0.2, w_kd=0.8, w_dist=1.0), tiny_teacher, text, pre)
    terms = objective(student, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    assert torch.isfinite(terms["loss"])
    assert ("ad" in terms) == (method.name == "rise") and ("kd" in terms) == method.uses_teacher
    terms["loss"].backward()
    assert student.backbone[0].weight.grad is not None and student.classifier.weight.grad is not None
    # The split head's projector learns only from the language terms.
    if head != "linear":
        assert (student.projector.weight.grad is not None) == (head == "rise" or method.name == "rise")


@pytest.fixture(scope="module")
def head_runs(tiny_data_root: Path, tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    """Tiny runs through the real command line, trained once for this module's tests."""
    folder = tmp_path_factory.mktemp("heads")
    recipe = _recipe(folder)
    runs = {"kd-linear": ["loss.method=kd", "student.head=linear"],
            "kd-split": ["loss.method=kd", "student.head=split"],
            "rise0-split": ["loss.method=rise", "loss.w_dist=0", "student.head=split"],
            "kd-rise": ["loss.method=kd", "student.head=rise"],
            "rise0-rise": ["loss.method=rise", "loss.w_dist=0", "student.head=rise"],
            "inferred": []}  # w_kd 0.8 and no loss.method
    outputs = {}
    for name, sets in runs.items():
        result = _train(tiny_data_root, tiny_clip_dir, folder / name, recipe, *sets, "train.steps=3")
        assert result.exit_code == 0, result.output
        outputs[name] = result.output
    (folder / "inferred.out").write_text(outputs["inferred"])
    return {name: folder / name for name in runs}


@pytest.mark.parametrize("head", ["split", "rise"])
def test_kd_and_rise_without_language_terms_train_identical_weights(head: str, head_runs) -> None:
    """RISE with w_dist = 0 is KD on the same head, bit for bit: the comparison isolates the terms."""
    a = load_file(head_runs[f"kd-{head}"] / "student.safetensors")
    b = load_file(head_runs[f"rise0-{head}"] / "student.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for run in ("kd", "rise0"):
        meta = json.loads((head_runs[f"{run}-{head}"] / "student.json").read_text())
        assert meta["head"]["kind"] == head and meta["head"]["embed_dim"] == EMBED
        assert f"head: {head}" in (head_runs[f"{run}-{head}"] / "recipe.yaml").read_text()


def test_kd_on_the_split_head_is_kd_on_the_linear_head(head_runs) -> None:
    """The split head's classifier starts and trains exactly as the linear head's: its projector
    only matters to RISE's language terms."""
    linear = load_file(head_runs["kd-linear"] / "student.safetensors")
    split = load_file(head_runs["kd-split"] / "student.safetensors")
    assert set(split) - set(linear) == {"projector.weight", "projector.bias"}
    assert all(torch.equal(linear[k], split[k]) for k in linear)


def test_an_inferred_method_is_printed(head_runs) -> None:
    output = (head_runs["inferred"].parent / "inferred.out").read_text()
    assert "note: loss.method is not set: training 'rise'" in output
    saved = (head_runs["inferred"] / "recipe.yaml").read_text()
    assert "method: rise" in saved and "head: split" in saved
    terms = {k for line in (head_runs["inferred"] / "metrics.jsonl").read_text().splitlines()
             for k in json.loads(line)}
    assert {"ce", "kd", "ad", "rd"} <= terms


def test_rise_refuses_a_head_without_a_projector(tiny_data_root: Path, tiny_clip_dir: Path,
                                                 tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _train(tiny_data_root, tiny_clip_dir, run_dir, _recipe(tmp_path),
                    "loss.method=rise", "student.head=linear")
    assert result.exit_code == 2
    assert "'linear' head has none" in result.output and "student.head to split" in result.output
    assert not run_dir.exists()  # refused before anything was written


def _tiny_backbone() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def test_heads_route_features_as_documented() -> None:
    images = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    split = Student(_tiny_backbone(), HeadSpec(8, 3, EMBED, "split"))
    h = split.backbone(images)
    z, logits = split(images, with_embedding=True)
    torch.testing.assert_close(logits, split.classifier(h))  # the classifier reads h, not z
    torch.testing.assert_close(z, split.projector(h))
    torch.testing.assert_close(split(images), logits)
    rise = Student(_tiny_backbone(), HeadSpec(8, 3, EMBED, "rise"))
    z, logits = rise(images, with_embedding=True)
    torch.testing.assert_close(logits, rise.classifier(z))
    assert rise.projector.weight.std().item() == pytest.approx(0.01, rel=0.3)  # N(0, 0.01)
    with pytest.raises(ValueError, match="only the 'rise' head"):
        split.init_classifier_from_text(torch.randn(3, EMBED))


def test_a_head_is_named_and_fits_its_kind(tiny_run: Path) -> None:
    """A student record names its head's kind; one without (or with a head that does not fit its
    kind) is a damaged record, one line, not a guess."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from rise_edge.errors import DamagedFile
    from rise_edge.run_dir import open_run

    weights = tiny_run / "student.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = dict(f.metadata())
    record = json.loads(metadata["rise_edge"])
    del record["head"]["kind"]
    save_file(load_file(str(weights)), str(weights), {**metadata, "rise_edge": json.dumps(record)})
    with pytest.raises(DamagedFile, match="does not describe a student"):
        open_run(tiny_run)
    with pytest.raises(ValueError, match="needs embed_dim"):
        HeadSpec(8, 3, None, "split")
    with pytest.raises(ValueError, match="not one of"):
        HeadSpec(8, 3, EMBED, "mlp")


def test_the_split_head_exports_image_to_logits(head_runs, tmp_path: Path) -> None:
    """The projector is a training branch: the exported graph computes logits alone and matches."""
    pytest.importorskip("onnxruntime")
    import shutil

    run_dir = Path(shutil.copytree(head_runs["inferred"], tmp_path / "run"))  # RISE, split head
    result = CliRunner().invoke(main, ["export", str(run_dir)])
    assert result.exit_code == 0, result.output
    import onnx

    graph = onnx.load(str(run_dir / "export" / "model.onnx")).graph
    assert len(graph.output) == 1 and graph.output[0].type.tensor_type.shape.dim[1].dim_value == 3
    assert not any("projector" in init.name for init in graph.initializer)
    record = json.loads((run_dir / "export" / "export.json").read_text())
    assert record["artefacts"]["onnx-fp32"]["status"] == "ok"  # parity with PyTorch held
