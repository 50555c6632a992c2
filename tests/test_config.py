from __future__ import annotations

import pytest

from wina_cli.config import Recipe, load_recipe, validate
from wina_cli.errors import ConfigError

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_unknown_key_names_its_path(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, "model: m\nsparsity:\n  target: 0.5\n  tagret: 0.4\n"))
    assert "`sparsity.tagret`" in e.value.message and "target" in e.value.message
    assert e.value.exit_code == 3


def test_wrong_type_names_its_path(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, "model: m\ndata:\n  num_samples: many\n"))
    assert "`data.num_samples` must be int" in e.value.message


def test_bad_yaml(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, "model: [unclosed\n"))
    assert "not valid YAML" in e.value.message


@pytest.mark.parametrize("target", [-0.1, 0.95, 1.0])
def test_target_out_of_range(target):
    r = Recipe(model="m")
    r.data.path = "x"
    r.sparsity.target = target
    with pytest.raises(ConfigError) as e:
        validate(r)
    assert "[0, 0.9]" in e.value.message


def test_bad_choice():
    r = Recipe(model="m")
    r.data.path = "x"
    r.sparsity.criterion = "magnitude"
    with pytest.raises(ConfigError) as e:
        validate(r)
    assert "sparsity.criterion" in e.value.message and "teal" in e.value.message


def test_integers_are_accepted_as_floats(tmp_path):
    r = load_recipe(write(tmp_path, "model: m\nsparsity:\n  target: 0\n"))
    assert r.sparsity.target == 0.0 and isinstance(r.sparsity.target, float)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "sample_configs").glob("*.yaml")))
def test_sample_configs_are_valid(name):
    validate(load_recipe(str(ROOT / "sample_configs" / name)))


def test_recipe_round_trips_through_yaml(tmp_path):
    r = Recipe(model="m")
    r.sparsity.target = 0.4
    r2 = load_recipe(write(tmp_path, r.to_yaml()))
    assert r2 == r


def test_quality_keys_are_checked(tmp_path):
    r = load_recipe(write(tmp_path, "model: m\ndata:\n  path: d\nsparsity:\n  max_ppl_increase: 0.01\n"
                                    "  dense_first: 4\nmethod: auto\nauto:\n  transforms: none, pca\n"))
    validate(r)
    from wina_cli.config import auto_transforms, needs_holdout

    assert auto_transforms(r) == ["none", "pca"] and needs_holdout(r)
    from wina_cli.config import auto_dense_first

    assert auto_dense_first(r) == [4]  # empty: the recipe's own policy only
    from wina_cli.config import kl_criteria

    assert kl_criteria(r) == []  # the costly KL table is measured only when asked for
    assert kl_criteria(load_recipe(write(tmp_path, "model: m\nsparsity:\n  allocation: kl\n  criterion: teal\n"
                                                   "allocation:\n  kl_criteria: wina, teal\n"))) == ["wina", "teal"]
    assert auto_dense_first(load_recipe(write(tmp_path, "model: m\nauto:\n  dense_first: 0, 4,4\n"))) == [0, 4]
    assert auto_dense_first(load_recipe(write(tmp_path, "model: m\nauto:\n  dense_first: 8\n"))) == [8]
    for bad, needle in (("sparsity:\n  max_ppl_increase: -0.1\n", "`sparsity.max_ppl_increase`"),
                        ("sparsity:\n  dense_first: -1\n", "`sparsity.dense_first`"),
                        ("sparsity:\n  allocation: layerwise\n", "`sparsity.allocation`"),
                        ("transform: spin\n", "`transform`"),
                        ("auto:\n  transforms: ''\n", "`auto.transforms`"),
                        ("auto:\n  dense_first: 0,four\n", "`auto.dense_first`"),
                        ("auto:\n  dense_first: '-2'\n", "`auto.dense_first`"),
                        ("holdout:\n  num_samples: 0\n", "`holdout.num_samples`"),
                        ("allocation:\n  kl_criteria: teal,tael\n", "`allocation.kl_criteria`"),
                        ("allocation:\n  kl_seq_len: 0\n", "`allocation.kl_seq_len`"),
                        ("allocation:\n  kl_estimate: taylor\n", "`allocation.kl_estimate`"),
                        ("allocation:\n  kl_draws: 0\n", "`allocation.kl_draws`")):
        with pytest.raises(ConfigError) as e:
            validate(load_recipe(write(tmp_path, "model: m\ndata:\n  path: d\n" + bad)))
        assert needle in e.value.message, (bad, e.value.message)


def test_export_section_is_checked(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, "model: m\nexport:\n  onxx: out\n"))
    assert "`export.onxx`" in e.value.message and "onnx_dense" in e.value.message
    r = load_recipe(write(tmp_path, "model: m\ndata:\n  path: d\noutput: a\nexport:\n  onnx: b\n  dtype: float16\n"))
    assert validate(r).export.onnx == "b"
    for bad, words in (({"dtype": "bfloat16"}, "export.dtype"), ({"attention": "flash"}, "export.attention"),
                       ({"onnx": "a"}, "same folder"), ({"onnx": "b", "onnx_dense": "./b"}, "same folder")):
        r = Recipe(model="m", output="a")
        r.data.path = "d"
        for k, v in bad.items():
            setattr(r.export, k, v)
        with pytest.raises(ConfigError) as e:
            validate(r)
        assert words in e.value.message, e.value.message
