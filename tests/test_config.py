"""Recipes: strict loading, clear messages for every bad input, and every shipped recipe loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from rise_edge.cli import main
from rise_edge.config import Recipe, dump_recipe, load_recipe, recipe_from_dict
from rise_edge.errors import UserError

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads(recipe: Path) -> None:
    loaded = load_recipe(recipe)
    assert loaded.data.target_domain, "a shipped recipe names its unseen domain"
    # The written form reads back to the same recipe (what the run directory stores).
    assert recipe_from_dict(yaml.safe_load(dump_recipe(loaded))) == loaded


def test_shipped_recipes_cover_datasets_and_students() -> None:
    names = {p.stem for p in RECIPES}
    for dataset in ("pacs", "vlcs", "officehome", "terra", "domainnet"):
        for student in ("resnet18", "resnet50", "lite0"):
            assert f"{dataset}_rise_{student}" in names
    assert {"pacs_erm_lite0", "pacs_erm_resnet18"} <= names


def test_overrides_apply_with_types() -> None:
    recipe = load_recipe(None, ["optim.lr=0.01", "train.epochs=3", "bench.batch_sizes=[1, 8]",
                                "student.image_size=null", "loss.w_kd=1"])
    assert recipe.optim.lr == 0.01 and recipe.train.epochs == 3
    assert recipe.bench.batch_sizes == (1, 8) and recipe.student.image_size is None
    assert recipe.loss.w_kd == 1.0 and isinstance(recipe.loss.w_kd, float)
    assert recipe.method == "rise" and Recipe().method == "erm"


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lrr: 0.1\n", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("optimm:\n  lr: 0.1\n", "unknown section 'optimm'; did you mean 'optim'?"),
    ("train:\n  epochs: -2\n", "'train.epochs' must be an integer >= 1 and <= 1000000, got -2"),
    ("train:\n  epochs: 2.5\n", "'train.epochs' must be an integer, got 2.5 (float)"),
    ("train:\n  augment: 'yes'\n", "'train.augment' must be true or false, got 'yes' (str)"),
    ("optim:\n  name: adam\n", "'optim.name' must be one of 'sgd', 'adamw', got 'adam'"),
    ("data:\n  val_fraction: 1.5\n", "'data.val_fraction' must be a number > 0.0 and <= 0.9, got 1.5"),
    ("data: [1, 2]\n", "section 'data' must be a mapping of keys"),
    ("- a\n- b\n", "a recipe is a mapping of sections"),
    ("data: {dataset: [\n", "not valid YAML at line"),
])
def test_bad_recipe_gives_one_message_and_status_2(tmp_path: Path, text: str, message: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    result = CliRunner().invoke(main, ["train", str(recipe)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert str(recipe) in result.output  # says where


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "--set optim.lr=-1: 'optim.lr' must be a number > 0.0 and <= 1000.0, got -1"),
    ("train.batchsize=4", "did you mean 'train.batch_size'?"),
    ("nonsense", "expected section.key=value"),
    ("foo.bar=1", "unknown section 'foo'"),
])
def test_bad_override(tmp_path: Path, override: str, message: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epochs: 1\n")
    result = CliRunner().invoke(main, ["train", str(recipe), "--set", override])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_missing_recipe_file_names_it_and_suggests(tmp_path: Path) -> None:
    (tmp_path / "pacs_erm.yaml").write_text("{}\n")
    result = CliRunner().invoke(main, ["train", str(tmp_path / "pacs_erm.yml")])
    assert result.exit_code == 2
    assert "recipe file not found" in result.output and "pacs_erm.yml" in result.output
    assert "did you mean" in result.output and "pacs_erm.yaml" in result.output


def test_user_error_is_exit_2() -> None:
    assert UserError("x").exit_code == 2


def test_loss_method_is_named_inferred_for_older_recipes_and_checked(tmp_path: Path) -> None:
    from rise_edge.config import recipe_from_dict
    from rise_edge.train.methods import method_of, resolved

    assert recipe_from_dict({}).method == "erm"
    assert recipe_from_dict({"loss": {"w_kd": 0.5}}).method == "rise"  # written before method
    # Resolution names the method and the head, and says when it inferred the method.
    named, notes = resolved(recipe_from_dict({"loss": {"w_kd": 0.5}}))
    assert (named.loss.method, named.student.head) == ("rise", "split")
    assert len(notes) == 1 and "loss.method is not set: training 'rise'" in notes[0]
    assert resolved(recipe_from_dict({"loss": {"method": "kd"}}))[1] == []
    # A run saved before head kinds trained RISE on the released head.
    assert resolved(recipe_from_dict({"loss": {"method": "rise"}}),
                    written_before_heads=True)[0].student.head == "rise"
    with pytest.raises(UserError, match="'linear' head has none"):
        resolved(recipe_from_dict({"loss": {"method": "rise"}, "student": {"head": "linear"}}))

    assert method_of(recipe_from_dict({"loss": {"method": "kd", "w_kd": 0.5}})).uses_teacher
    assert not method_of(recipe_from_dict({"loss": {"method": "erm", "w_kd": 0.5}})).uses_teacher
    with pytest.raises(UserError, match="loss.method 'risee' is not a training method; did you mean "
                                        "'rise'"):
        method_of(recipe_from_dict({"loss": {"method": "risee"}}))


def test_documented_on_off_values_survive_yaml_booleans(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare off/on/yes/no as a boolean; a field whose choices are such words reads
    the boolean as the word, in a recipe file and in --set alike."""
    from rise_edge.config import load_recipe

    recipe = tmp_path / "r.yaml"
    for text, expected in (("off", "off"), ("on", "on"), ("no", "off"), ("yes", "on"),
                           ("auto", "auto")):
        recipe.write_text(f"export:\n  qat: {text}\n")
        assert load_recipe(recipe).export.qat == expected
        assert load_recipe(None, [f"export.qat={text}"]).export.qat == expected
    recipe.write_text("train:\n  device: off\n")  # no on/off among its choices: still refused
    with pytest.raises(UserError, match="'train.device' must be one of"):
        load_recipe(recipe)


@pytest.mark.parametrize("override", ["train.seed=18446744073709551616", "train.seed=4294967296",
                                      "data.split_seed=99999999999999999999",
                                      "export.calibration_seed=4294967296"])
def test_seeds_too_large_for_torch_and_numpy_are_refused_where_they_enter(override: str) -> None:
    from rise_edge.config import load_recipe

    with pytest.raises(UserError, match="<= 4294967295"):
        load_recipe(None, [override])
    assert load_recipe(None, ["train.seed=4294967295"]).train.seed == 4294967295


def test_every_recipe_value_the_docs_show_loads_as_written() -> None:
    """Every `--set section.key=value` and `section.key: value` README.md and docs/ show is a value a
    recipe takes, written exactly so (the YAML trap: a bare `off` reads as false)."""
    import re

    from rise_edge.config import load_recipe

    repo = Path(__file__).parents[1]
    pages = [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
    shown: set[tuple[str, str]] = set()
    for page in pages:
        text = page.read_text()
        shown |= set(re.findall(r"--set ([a-z_]+\.[a-z_0-9]+)=([^\s`)]+)", text))
        shown |= set(re.findall(r"`([a-z_]+\.[a-z_0-9]+): ([^`]+)`", text))
    placeholders = ("...", "value", "[values]", "NEW_ROOT", "/path/to/weights")
    checked = 0
    for key, value in sorted(shown):
        if key == "section.key" or value in placeholders or re.fullmatch(r"[A-Z][A-Z_]*", value):
            continue  # a placeholder (K, NEW_ROOT), not a value
        section, field = key.split(".")
        as_file = load_recipe_text(f"{section}:\n  {field}: {value}\n")
        as_set = load_recipe(None, [f"{key}={value}"])
        assert as_file == as_set, key
        checked += 1
    assert checked >= 10  # the pages do show values; an empty scan would pass silently


def load_recipe_text(text: str):
    import tempfile

    from rise_edge.config import load_recipe

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.yaml"
        path.write_text(text)
        return load_recipe(path)
