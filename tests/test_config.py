"""Config layering (defaults <- recipe <- options <- --set) and error collection."""

from __future__ import annotations

from pathlib import Path

import pytest

from unimm.config import PrepareConfig, build_config, parse_override
from unimm.errors import ConfigError

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_layers_apply_in_order(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "prepare:\n  workers: 3\n  image_size: 224\n  jpeg_quality: 80\nteachers:\n  batch_size: 7\n"
    )
    cfg = build_config(
        PrepareConfig,
        recipe=recipe,
        options={
            "prepare.inputs": ["a.jsonl"],
            "prepare.out": "o",
            "prepare.workers": 5,
            "prepare.jpeg_quality": None,
        },
        overrides=["prepare.image_size=112", "teachers.device=cuda:1"],
    )
    assert cfg.prepare.workers == 5  # option beats recipe
    assert cfg.prepare.jpeg_quality == 80  # option not given: recipe stays
    assert cfg.prepare.image_size == 112  # --set beats recipe
    assert cfg.teachers.batch_size == 7
    assert cfg.teachers.device == "cuda:1"
    assert cfg.prepare.samples_per_shard == 1000  # default


def test_all_problems_reported_together(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prepare:\n  wrokers: 2\n  jpeg_quality: high\ntrain_typo: {}\n")
    with pytest.raises(ConfigError) as info:
        build_config(
            PrepareConfig,
            recipe=recipe,
            options={"prepare.inputs": ["a"], "prepare.out": "o"},
            overrides=["prepare.on_error=ignore", "noequals"],
        )
    text = str(info.value)
    for expected in (
        "prepare.wrokers: unknown key",
        "prepare.jpeg_quality: expected int, got 'high'",
        "train_typo: unknown recipe section",
        "prepare.on_error: expected one of 'fail' | 'skip', got 'ignore'",
        "expected KEY=VALUE",
    ):
        assert expected in text, text
    assert len(info.value.problems) == 5


def test_value_checks_name_the_key():
    with pytest.raises(ConfigError) as info:
        build_config(PrepareConfig, overrides=["prepare.jpeg_quality=0", "prepare.workers=0"])
    problems = "\n".join(info.value.problems)
    assert "prepare.jpeg_quality: must be in 1..100, got 0" in problems
    assert "prepare.workers: must be >= 1, got 0" in problems
    assert "prepare.inputs: give at least one input file" in problems
    assert "--out DIR" in problems


def test_teacher_combinations():
    base = {"prepare.inputs": ["a"], "prepare.out": "o"}
    build_config(PrepareConfig, options={**base, "teachers.clip": "c"})  # CLIP alone is allowed
    with pytest.raises(ConfigError, match="give both --teacher-image-expert and --teacher-text-expert"):
        build_config(PrepareConfig, options={**base, "teachers.image_expert": "d", "teachers.clip": "c"})
    with pytest.raises(ConfigError, match="add --teacher-clip"):
        build_config(
            PrepareConfig, options={**base, "teachers.image_expert": "d", "teachers.text_expert": "b"}
        )


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("a.b=3", "a.b", 3),
        ("a=true", "a", True),
        ("x.y=[1, 2]", "x.y", [1, 2]),
        ("p=null", "p", None),
        ("lr=2e-4", "lr", "2e-4"),
        ("s=", "s", ""),
    ],
)
def test_parse_override(text, key, value):
    assert parse_override(text) == (key, value)


def test_string_numbers_coerced_for_float_and_list(tmp_path):
    # PyYAML reads 2e-4 as a string; a single value where a list is expected becomes a list.
    cfg = build_config(PrepareConfig, overrides=["prepare.inputs=one.jsonl", "prepare.out=o"])
    assert cfg.prepare.inputs == ["one.jsonl"]


def test_bad_yaml_names_file_and_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("prepare:\n  workers: 2\n   bad: [\n")
    with pytest.raises(ConfigError, match=r"(?s)bad.yaml.*line 3: not valid YAML"):
        build_config(PrepareConfig, recipe=recipe)


def test_missing_recipe_is_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)nope.yaml.*no such file, and no shipped recipe .*tiny-cpu"):
        build_config(PrepareConfig, recipe=tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not a file"):
        build_config(PrepareConfig, recipe=tmp_path)


@pytest.mark.parametrize(
    "name", ["tiny-cpu", "tiny-cpu.yaml", "recipes/tiny-cpu.yaml", "./recipes/tiny-cpu.yaml"]
)
def test_shipped_recipes_by_name(name, tmp_path, monkeypatch):
    """A shipped recipe is found by name from any directory; a file of that path there wins."""
    from unimm.config import SHIPPED_RECIPES, resolve_recipe, shipped_recipes

    monkeypatch.chdir(tmp_path)
    assert resolve_recipe(name) == SHIPPED_RECIPES / "tiny-cpu.yaml"
    assert set(shipped_recipes()) >= {"tiny-cpu", "llava-7b-lora", "accelerate/ddp", "accelerate/fsdp"}
    own = tmp_path / "recipes" / "tiny-cpu.yaml"
    own.parent.mkdir()
    own.write_text("train:\n  max_steps: 7\n")
    assert resolve_recipe("recipes/tiny-cpu.yaml") == Path("recipes/tiny-cpu.yaml")
    assert resolve_recipe("tiny-cpu") == SHIPPED_RECIPES / "tiny-cpu.yaml"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_loads(recipe):
    """Every shipped recipe builds every command config it has sections for, without problems."""
    from unimm.config import TrainConfig, load_recipe

    data = load_recipe(recipe)
    assert data, f"{recipe} is empty"
    cfg = build_config(PrepareConfig, recipe=recipe, options={"prepare.inputs": ["x"], "prepare.out": "o"})
    assert isinstance(cfg, PrepareConfig)
    if "train" in data:  # a training recipe: it builds with the flags its header says to add
        needs_path = data.get("model", {}).get("path", "") is None and not data.get("model", {}).get("tiny")
        extra = ["model.path=/models/llava"] if needs_path else []
        train = build_config(
            TrainConfig, recipe=recipe, options={"out": "run"}, overrides=["data.train=shards", *extra]
        )
        assert train.train.max_steps >= 1


ACCELERATE = sorted((Path(__file__).parents[1] / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.name for p in ACCELERATE])
def test_accelerate_configs_parse(path):
    import yaml

    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in ("MULTI_GPU", "FSDP")
    # Left to the machine: --num_processes at launch, the precision from train.mixed_precision.
    assert "num_processes" not in cfg and "mixed_precision" not in cfg
    assert "--num_processes" in path.read_text()  # the header's command gives the flag


def test_recipes_exist():
    assert RECIPES, "recipes/ must ship at least one recipe"


def test_every_recipe_section_has_one_dataclass():
    from unimm.config import RECIPE_SECTIONS, SECTIONS

    assert set(SECTIONS) == RECIPE_SECTIONS


def test_only_true_and_false_are_booleans(tmp_path):
    """YAML 1.1 reads no/yes/on/off as booleans; `--set train.mixed_precision=no` must mean "no"."""
    from unimm.config import TrainConfig, build_config
    from unimm.config.build import parse_override

    assert [parse_override(f"a={v}")[1] for v in ("no", "yes", "off", "true", "False")] == [
        "no",
        "yes",
        "off",
        True,
        False,
    ]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model:\n  tiny: true\n  lora: false\ndata:\n  train: [s]\ntrain:\n  mixed_precision: no\n"
    )
    cfg = build_config(TrainConfig, recipe=recipe, options={"out": "x"}, overrides=["model.train_lm=true"])
    assert cfg.train.mixed_precision == "no" and cfg.model.lora is False and cfg.model.train_lm is True
    # a bool field still takes yes/no (the field's type decides), a string field keeps the word
    lora = build_config(TrainConfig, recipe=recipe, options={"out": "x"}, overrides=["model.lora=yes"])
    assert lora.model.lora is True
    with pytest.raises(ConfigError, match=r"model\.lora: expected bool, got 'maybe'"):
        build_config(TrainConfig, recipe=recipe, options={"out": "x"}, overrides=["model.lora=maybe"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=.inf", "train.lr: must be a finite number, got inf"),
        ("train.lr=nan", "train.lr: must be a finite number, got 'nan'"),
        ("train.lr=-inf", "train.lr: must be a finite number, got '-inf'"),
        ("align.delta=.nan", "align.delta: must be a finite number"),
        ("align.sigma=.inf", "align.sigma: must be a finite number"),
        ("data.weights=[1.0, .inf]", "data.weights: must be a finite number"),
        ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0, got -0.1"),
        ("train.max_grad_norm=-1", "train.max_grad_norm: must be >= 0 (0 = no clipping), got -1.0"),
        ("train.seed=-1", "train.seed: must be >= 0, got -1"),
        ("train.lr=0", "train.lr: must be > 0, got 0.0"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio: must be in [0, 1), got 1.5"),
    ],
)
def test_non_finite_negative_and_out_of_range_numbers_are_refused(override, message):
    """`--set train.lr=.inf` trained to NaN weights and exited 0; every such value is refused at
    start, naming its key."""
    from unimm.config import TrainConfig

    with pytest.raises(ConfigError) as caught:
        build_config(TrainConfig, recipe="tiny-cpu", overrides=[override, "data.train=x"])
    assert message in str(caught.value)


def test_a_non_finite_number_in_a_recipe_file_is_refused(tmp_path):
    from unimm.config import TrainConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: .inf\nalign:\n  delta: .NaN\n")
    with pytest.raises(ConfigError) as caught:
        build_config(TrainConfig, recipe=recipe, overrides=["data.train=x", "model.tiny=true"])
    assert "train.lr: must be a finite number" in str(caught.value)
    assert "align.delta: must be a finite number" in str(caught.value)
