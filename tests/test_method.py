"""Which method a recipe file trains: `ray.method`, else its handbook folder, checked against the keys it sets.
Pure logic on made-up field sets (fast, no TRL import), plus the real TRL configs once."""

from pathlib import Path

import pytest

from raytrain_align.errors import RecipeError
from raytrain_align.recipe import decide_method, fitting_methods

FIELDS = {"sft": {"packing", "loss_type", "max_length"}, "dpo": {"beta", "loss_type", "max_length"},
          "orpo": {"beta", "max_length"}}


def test_keys_narrow_the_methods():
    assert fitting_methods({"packing", "learning_rate"}, FIELDS) == ["sft"]
    assert fitting_methods({"beta"}, FIELDS) == ["dpo", "orpo"]
    assert fitting_methods({"beta", "loss_type"}, FIELDS) == ["dpo"]
    assert fitting_methods({"learning_rate", "max_length"}, FIELDS) == ["sft", "dpo", "orpo"]  # nothing specific
    assert fitting_methods({"beta", "packing"}, FIELDS) == []


def test_folder_decides_and_explicit_beats_it():
    assert decide_method(Path("r/zephyr/dpo/config_full.yaml"), {"beta"}, None, FIELDS) == "dpo"
    assert decide_method(Path("dpo/zephyr/sft/x.yaml"), {"learning_rate"}, None, FIELDS) == "sft"  # the nearest folder
    assert decide_method(Path("r/orpo/x.yaml"), {"beta"}, "dpo", FIELDS) == "dpo"


def test_keys_decide_when_no_folder_does():
    assert decide_method(Path("/tmp/x.yaml"), {"beta", "loss_type"}, None, FIELDS) == "dpo"
    assert decide_method(Path("/tmp/x.yaml"), {"packing"}, None, FIELDS) == "sft"


@pytest.mark.parametrize("path, keys, explicit, expected", [
    ("/tmp/x.yaml", {"beta"}, None, "its keys fit dpo or orpo); set ray.method to one of sft, dpo, orpo"),
    ("/tmp/x.yaml", {"learning_rate"}, None, "its keys fit sft or dpo or orpo"),
    ("r/sft/x.yaml", {"beta", "loss_type"}, None, "its folder 'sft/' says SFT, but it sets beta, which SFT does not have"),
    ("r/dpo/x.yaml", {"packing"}, "dpo", "ray.method says DPO, but it sets packing"),
    ("r/x.yaml", {"beta"}, "kto", "ray.method is 'kto'; use one of sft, dpo, orpo"),
])
def test_disagreement_or_nothing_deciding_is_one_line_naming_the_choices(path, keys, explicit, expected):
    with pytest.raises(RecipeError) as e:
        decide_method(Path(path), keys, explicit, FIELDS)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_method_the_project_does_not_train_is_one_line():
    fields = {**FIELDS, "kto": {"desirable_weight", "max_length"}}
    for path, explicit, why in (("r/kto/x.yaml", None, "its folder 'kto/'"), ("r/x.yaml", "kto", "ray.method")):
        with pytest.raises(RecipeError) as e:
            decide_method(Path(path), {"desirable_weight"}, explicit, fields)
        assert f"trains KTO ({why}), which raytrain_align does not support yet; supported: sft, dpo, orpo" in str(e.value)


def test_real_trl_configs_tell_dpo_from_orpo_and_sft():
    from raytrain_align.recipe import _method_fields

    fields = _method_fields()
    assert fitting_methods({"beta", "loss_type"}, fields) == ["dpo"]  # apo.yaml's
    assert fitting_methods({"beta", "max_completion_length"}, fields) == ["orpo"]
    assert fitting_methods({"packing", "dataset_text_field"}, fields) == ["sft"]
    assert fitting_methods({"beta"}, fields) == ["dpo", "orpo"]
