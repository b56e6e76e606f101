import re

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
    # a template is read as str.format reads it: "{{cls}}" is the text "{cls}", not a field
    (dict(classes=C, domains=D, forget_classes=["dog"], templates=["a photo of {{cls}}."]),
     r"template 'a photo of \{\{cls\}\}.' has no '\{cls\}'"),
    (dict(classes=C, domains=D, forget_classes=["dog"], templates=["a {cls"]), "'a {cls' is not a format string"),
    (dict(classes=C, domains=D, forget_classes=["dog"], templates=["a {} {cls}"]), r"other than .*: \{\}"),
    (dict(classes=C, domains=D, forget_classes=["dog"], templates=["a {cls.upper}"]), r"\{cls.upper\}"),
    (dict(classes=C, domains=D, forget_classes=["dog"], templates=["a {cls:{w}}"]), "does not format"),
])
def test_bad_specs_raise_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ForgetSpec(**kwargs)


def test_string_instead_of_list_is_a_type_error():
    with pytest.raises(TypeError, match="classes"):
        ForgetSpec("dog", D, forget_classes=["dog"])


@pytest.mark.parametrize("kwargs", [dict(domain_phrases="abc"), dict(class_phrases=["x"]),
                                    dict(class_phrases=[("dog", "hound")])])
def test_phrases_must_be_a_mapping(kwargs):
    (what, value), = kwargs.items()
    with pytest.raises(TypeError, match=f"{what} must be a mapping .*{re.escape(repr(value))}"):
        ForgetSpec(C, D, forget_classes=["dog"], **kwargs)


def test_templates_with_escapes_and_format_specs_that_read_as_fields():
    s = ForgetSpec(C, D, forget_classes=["dog"], templates=["{{{cls}}} in {domain}", "a {cls!s:>5}"])
    assert s.prompts(("cat", "photo")) == ["{cat} in photo", "a   cat"]


@pytest.mark.parametrize("spec", [
    ForgetSpec(C, D, forget_classes=["dog"]), ForgetSpec(C, D, forget_classes=["dog"], forget_domains=["sketch"]),
    ForgetSpec(C, D, forget_domains=["sketch"]), ForgetSpec(C, D, forget_classes=C),
    ForgetSpec(C, D, forget_classes=["dog"], forget_domains=D),
    ForgetSpec.from_cells(C, D, [("cat", "photo"), ("dog", "sketch")], [("dog", "photo")]),
], ids=lambda s: s.mode)
def test_from_dict_keeps_every_mode_a_spec_can_save(spec):
    again = ForgetSpec.from_dict(spec.to_dict())
    assert again.mode == spec.mode and again.to_dict() == spec.to_dict()


@pytest.mark.parametrize("mode, cells, match", [
    ("banana", [("dog", "photo")], r"mode 'banana' is not one of \('global'"),
    ([], [("dog", "photo")], "mode \\[\\] is not one of"),
    ("global", [("dog", "photo")], r"mode 'global' does not match the cells: .*\['photo'\] only"),
    ("domain-complete", [("dog", "sketch")], r"mode 'domain-complete' does not match the cells: .*not every class"),
    ("domain", [("dog", "photo"), ("cat", "sketch")], "not every pair of its classes and domains"),
])
def test_from_dict_refuses_a_mode_its_cells_cannot_have(mode, cells, match):
    d = ForgetSpec.from_cells(C, D, cells).to_dict()
    with pytest.raises(ValueError, match=match):
        ForgetSpec.from_dict({**d, "mode": mode})
    kept_some = ForgetSpec(C, D, forget_classes=["dog"]).to_dict()
    kept_some["retain_cells"] = kept_some["retain_cells"][:1]      # only a "cells" spec keeps fewer cells
    with pytest.raises(ValueError, match="retain_cells is not every cell outside forget_cells"):
        ForgetSpec.from_dict(kept_some)


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


@pytest.mark.parametrize("field, value, why", [
    ("use_text", "False", "must be True or False"), ("use_prototypes", "no", "must be True or False"),
    ("use_text", 0, "must be True or False"), ("batch_size", True, "must be an int"),
    ("alpha", True, "must be a finite number"), ("step_size", "0.1", "must be a finite number"),
    ("step_size", None, "must be a finite number"), ("step_size", float("inf"), "must be a finite number"),
    ("pixel_decay", float("inf"), "must be a finite number"), ("redirect_gain", float("inf"), "must be a finite"),
    ("retain_weight", float("inf"), "must be a finite"), ("domain_keep_weight", float("inf"), "must be a finite"),
    ("accept_prob", float("nan"), "must be a finite"), ("forget_energy", "high", "must be a finite"),
    ("gate_keep_order", float("inf"), "must be None or a finite number"),
    ("retain_energy", float("nan"), "must be None or a finite number"),
    ("gate_keep_order", "10", "must be None or a finite number"),
    ("device", "foo", "is not a device name"), ("device", 5, "must be None or a device name"),
])
def test_config_type_errors_name_the_field_and_the_value(field, value, why):
    with pytest.raises(ValueError, match=re.escape(f"ForgetConfig.{field}={value!r}: {why}")):
        ForgetConfig(**{field: value})


def test_config_defaults_and_device_names_are_accepted():
    c = ForgetConfig()
    assert (c.step_size, c.batch_size, c.use_text, c.device) == (0.1, 128, True, None)
    for device in ("cpu", "cuda", "cuda:1"):     # the name only: whether this machine has it is the CLI's check
        assert ForgetConfig(device=device).device == device
    assert ForgetConfig(step_size=1, alpha=0, gate_keep_order=5).step_size == 1     # ints are numbers


def test_config_round_trip_and_frozen():
    c = ForgetConfig(alpha=0.5)
    assert ForgetConfig.from_dict(c.to_dict()) == c
    with pytest.raises(Exception):
        c.alpha = 1.0
    with pytest.raises(ValueError, match="unknown fields"):
        ForgetConfig.from_dict({"alhpa": 1})
