"""Decision rules read like their names, compose in order, and come from config."""

import pytest
from pydantic import TypeAdapter, ValidationError

from defectd.pipeline.config import AreaRuleConfig, RuleConfig, RulesConfig
from defectd.pipeline.inspection import Defect, Verdict
from defectd.pipeline.rules import (
    AnyDefectRule,
    AreaRule,
    CountRule,
    ScoreRule,
    build_rules,
    decide,
)


def defect(area: int, score: float, mm2: float | None = None) -> Defect:
    return Defect(area, (0, 0, 1, 1), (0.0, 0.0), score, score, mm2)


def test_area_rule_in_mm2_fires_on_a_large_confident_defect_only() -> None:
    rule = AreaRule(min_area_mm2=0.5, min_score=0.6)
    assert rule.name == "area>=0.5mm2&score>=0.6"
    assert rule.fires([defect(10, 0.9, mm2=0.6)])
    assert not rule.fires([defect(10, 0.5, mm2=0.6)])
    assert not rule.fires([defect(10, 0.9, mm2=0.4)])


def test_a_defect_without_a_calibrated_area_never_meets_a_mm2_bound() -> None:
    assert not AreaRule(min_area_mm2=0.0).fires([defect(10_000, 1.0, mm2=None)])


def test_area_rule_in_pixels() -> None:
    rule = AreaRule(min_area_px=40)
    assert rule.name == "area>=40px"
    assert rule.fires([defect(5, 0.9), defect(40, 0.7)])
    assert not rule.fires([defect(39, 1.0)])


def test_count_rule_fires_above_its_limit() -> None:
    rule = CountRule(max_defects=3)
    assert rule.name == "count>3"
    assert not rule.fires([defect(1, 1.0)] * 3)
    assert rule.fires([defect(1, 1.0)] * 4)


def test_count_rule_counts_only_confident_defects_when_asked() -> None:
    rule = CountRule(max_defects=1, min_score=0.8)
    assert rule.name == "count(score>=0.8)>1"
    assert not rule.fires([defect(1, 0.9), defect(1, 0.5), defect(1, 0.5)])


def test_score_rule() -> None:
    assert ScoreRule(0.95).name == "score>=0.95"
    assert ScoreRule(0.95).fires([defect(1, 0.96)])
    assert not ScoreRule(0.95).fires([defect(1_000, 0.9)])


def test_the_first_rule_that_fires_decides_and_is_named() -> None:
    rules = [AreaRule(min_area_px=100), CountRule(max_defects=1), AnyDefectRule()]
    assert decide(rules, [defect(5, 0.9), defect(5, 0.9)]) == (Verdict.FAIL, "count>1")
    assert decide(rules, [defect(500, 0.9)]) == (Verdict.FAIL, "area>=100px")
    assert decide(rules, [defect(5, 0.9)]) == (Verdict.FAIL, "any-defect")


def test_a_part_no_rule_fails_passes_with_rule_none() -> None:
    assert decide([AreaRule(min_area_px=100)], [defect(5, 0.9)]) == (Verdict.PASS, "none")
    assert decide([], []) == (Verdict.PASS, "none")


def test_rules_are_built_from_config_dicts_in_order() -> None:
    cfg = RulesConfig.model_validate(
        {
            "rules": [
                {"kind": "area", "min_area_mm2": 0.5, "min_score": 0.6},
                {"kind": "count", "max_defects": 3},
                {"kind": "score", "min_score": 0.99},
            ]
        }
    )
    assert [r.name for r in build_rules(cfg)] == [
        "area>=0.5mm2&score>=0.6",
        "count>3",
        "score>=0.99",
    ]
    assert [r.needs_scale for r in build_rules(cfg)] == [True, False, False]


def test_default_rules_fail_on_any_defect() -> None:
    assert [r.name for r in build_rules(RulesConfig())] == ["any-defect"]


def test_an_area_rule_without_an_area_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="needs min_area_px or min_area_mm2"):
        AreaRuleConfig(min_score=0.5)


def test_an_unknown_rule_kind_names_the_kind() -> None:
    with pytest.raises(ValidationError, match="kind"):
        TypeAdapter(RuleConfig).validate_python({"kind": "colour", "min_score": 0.5})


# ------------------------------------------------------------------ rules by class


def of_class(cls: str, area: int, score: float = 0.9, mm2: float | None = None) -> Defect:
    return Defect(area, (0, 0, 1, 1), (0.0, 0.0), score, score, mm2, cls=cls)


def test_a_rule_with_a_class_looks_only_at_that_class() -> None:
    config = RulesConfig.model_validate(
        {"rules": [{"kind": "area", "class": "scratch", "min_area_mm2": 2}]}
    )
    (rule,) = build_rules(config)
    assert rule.name == "scratch:area>=2mm2"
    assert rule.fires([of_class("scratch", 50, mm2=2.5)])
    assert not rule.fires([of_class("inclusion", 5000, mm2=40.0), of_class("scratch", 5, mm2=1.0)])


@pytest.mark.parametrize(
    ("rule", "name"),
    [
        (CountRule(1, cls="pit"), "pit:count>1"),
        (ScoreRule(0.8, cls="pit"), "pit:score>=0.8"),
        (AnyDefectRule(cls="pit"), "pit:any-defect"),
    ],
)
def test_every_kind_of_rule_takes_a_class(rule: object, name: str) -> None:
    pits = [of_class("pit", 3), of_class("pit", 4)]
    others = [of_class("chip", 9), of_class("chip", 9), of_class("chip", 9)]
    assert rule.name == name  # type: ignore[attr-defined]
    assert rule.fires(pits + others)  # type: ignore[attr-defined]
    assert not rule.fires(others)  # type: ignore[attr-defined]


def test_a_rule_naming_a_class_the_model_lacks_is_refused_naming_both() -> None:
    from defectd.errors import ConfigError
    from defectd.model.card import ModelCard
    from defectd.pipeline.rules import check_rule_classes

    card = ModelCard(name="steel", classes=("inclusion", "patches", "scratches"))
    good = RulesConfig.model_validate({"rules": [{"kind": "any", "class": "patches"}]})
    check_rule_classes(good, card)
    bad = RulesConfig.model_validate(
        {"rules": [{"kind": "any"}, {"kind": "area", "class": "scratch", "min_area_px": 3}]}
    )
    with pytest.raises(ConfigError, match=r"rules\.rules\.1\.class: 'scratch'.*scratches"):
        check_rule_classes(bad, card)


def test_rules_without_a_class_keep_their_config_hash() -> None:
    from defectd.pipeline.config import config_hash

    config = RulesConfig.model_validate(
        {"rules": [{"kind": "area", "min_area_px": 40}, {"kind": "count", "max_defects": 3}]}
    )
    assert "class" not in str(config.model_dump(mode="json"))
    # The hash these rules had before rules took a class: verdicts of existing stations
    # keep the config hash they were stamped with.
    assert config_hash(config) == "7a625d4e2db4fa97"
