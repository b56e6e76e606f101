import pytest

from clipforget_fast import ForgetConfig, ForgetSpec

C, D = ["dog", "cat", "car"], ["photo", "sketch"]
ALL = {(c, d) for c in C for d in D}


def test_global_mode_forgets_class_in_every_domain():
    s = ForgetSpec(C, D, forget_classes=["dog"])
    assert s.mode == "global"
    assert s.forget_cells == {("dog", "photo"), ("dog", "sketch")}
    assert s.retain_cells == ALL - s.forget_cells


def test_domain_mode_forgets_only_chosen_domain():
    s = ForgetSpec(C, D, forget_classes=["dog"], forget_domains=["sketch"])
    assert s.mode == "domain"
    assert s.forget_cells == {("dog", "sketch")}
    assert ("dog", "photo") in s.retain_cells and len(s.retain_cells) == 5


def test_domain_complete_mode_forgets_every_class_in_domain():
    s = ForgetSpec(C, D, forget_domains=["sketch"])
    assert s.mode == "domain-complete"
    assert s.forget_cells == {(c, "sketch") for c in C}
    assert s.retain_cells == {(c, "photo") for c in C}


def test_cells_orders_forget_first_and_prompts_use_phrases():
    s = ForgetSpec(C, ["photo", "pixel_art"], forget_classes=["car"])
    assert s.cells[:2] == [("car", "photo"), ("car", "pixel_art")]
    assert "a pixel art image of a car." in s.prompts(("car", "pixel_art"))


def test_from_cells_and_round_trip():
    s = ForgetSpec.from_cells(C, D, [("cat", "photo")], [("dog", "photo")])
    assert s.mode == "cells" and s.retain_cells == {("dog", "photo")}
    again = ForgetSpec.from_dict(s.to_dict())
    assert again.forget_cells == s.forget_cells and again.retain_cells == s.retain_cells


@pytest.mark.parametrize("kwargs, match", [
    (dict(classes=[], domains=D, forget_domains=["photo"]), "classes is empty"),
    (dict(classes=C, domains=[], forget_classes=["dog"]), "domains is empty"),
    (dict(classes=C, domains=D), "nothing to forget"),
    (dict(classes=C, domains=D, forget_classes=["wolf"]), "'wolf'"),
    (dict(classes=C, domains=D, forget_domains=["cubism"]), "'cubism'"),
    (dict(classes=["dog", "dog"], domains=D, forget_classes=["dog"]), "twice"),
    (dict(classes=C, domains=D, forget_classes=["dog", "dog"]), "twice"),
    (dict(classes=C, domains=D, forget_classes=[]), "empty"),
    (dict(classes=C, domains=D, forget_classes=["dog"], templates=["a photo"]), "no '{cls}'"),
    (dict(classes=C, domains=D, forget_classes=["dog"], templates=["a {cls} {x}"]), "placeholder"),
])
def test_bad_specs_raise_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ForgetSpec(**kwargs)


def test_string_instead_of_list_is_a_type_error():
    with pytest.raises(TypeError, match="classes"):
        ForgetSpec("dog", D, forget_classes=["dog"])


def test_cell_in_both_forget_and_retain_raises():
    with pytest.raises(ValueError, match="both"):
        ForgetSpec.from_cells(C, D, [("dog", "photo")], [("dog", "photo")])
    with pytest.raises(ValueError, match="unknown domain"):
        ForgetSpec.from_cells(C, D, [("dog", "oil")])


@pytest.mark.parametrize("field, value", [
    ("alpha", 1.5), ("targets", "everything"), ("retain_energy", 0.0), ("retain_energy", True), ("max_rank", 0),
    ("token_policy", "cls"), ("solver", "lanczos"), ("batch_size", 0), ("steps", -1),
    ("accept_prob", 0.0), ("dtype", "int8"), ("prototypes_per_cell", 2.5), ("min_steps", -1), ("min_steps", 150),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ForgetConfig(**{field: value})


def test_config_round_trip_and_frozen():
    c = ForgetConfig(alpha=0.5)
    assert ForgetConfig.from_dict(c.to_dict()) == c
    with pytest.raises(Exception):
        c.alpha = 1.0
    with pytest.raises(ValueError, match="unknown fields"):
        ForgetConfig.from_dict({"alhpa": 1})
