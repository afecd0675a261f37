"""Decision rules: from measured defects to a verdict, naming the rule that decided it.

A rule is a tiny object with a ``name`` (an expression an operator can read, e.g.
``area>=0.5mm2&score>=0.6`` or ``count>3``) and ``fires(defects) -> bool``. ``decide``
evaluates rules in order; the first that fires fails the part and its name becomes the
verdict's ``rule``. A part no rule fails passes with ``rule="none"``.

A rule with a class (``{ kind = "area", class = "scratch", min_area_mm2 = 2 }``) looks only at
the defects of that class of a multi-class model, and its name says so: ``scratch:area>=2mm2``.
:func:`check_rule_classes` refuses a class the model card does not list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from defectd.errors import ConfigError
from defectd.model.card import ModelCard
from defectd.pipeline.config import (
    AnyDefectRuleConfig,
    AreaRuleConfig,
    CountRuleConfig,
    RuleConfig,
    RulesConfig,
    ScoreRuleConfig,
)
from defectd.pipeline.inspection import Defect, Verdict

PASS_RULE = "none"


class Rule(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def needs_scale(self) -> bool:
        """Whether the rule reads ``area_mm2`` (the camera needs a calibrated mm per pixel)."""
        ...

    def fires(self, defects: Sequence[Defect]) -> bool: ...


def _num(value: float) -> str:
    return f"{value:g}"


def _named(cls: str | None, name: str) -> str:
    return name if cls is None else f"{cls}:{name}"


def _of(cls: str | None, defects: Sequence[Defect]) -> Sequence[Defect]:
    return defects if cls is None else [d for d in defects if d.cls == cls]


@dataclass(frozen=True, slots=True)
class AreaRule:
    """Any defect with area >= ``min_area_px`` px and/or >= ``min_area_mm2`` mm² and peak
    score >= ``min_score``. A defect without a mm² area never satisfies a mm² bound."""

    min_area_px: int | None = None
    min_area_mm2: float | None = None
    min_score: float = 0.0
    cls: str | None = None

    @property
    def name(self) -> str:
        parts = []
        if self.min_area_px is not None:
            parts.append(f"area>={self.min_area_px}px")
        if self.min_area_mm2 is not None:
            parts.append(f"area>={_num(self.min_area_mm2)}mm2")
        if self.min_score > 0:
            parts.append(f"score>={_num(self.min_score)}")
        return _named(self.cls, "&".join(parts))

    @property
    def needs_scale(self) -> bool:
        return self.min_area_mm2 is not None

    def matches(self, d: Defect) -> bool:
        if self.cls is not None and d.cls != self.cls:
            return False
        if self.min_area_px is not None and d.area_px < self.min_area_px:
            return False
        if self.min_area_mm2 is not None and (d.area_mm2 is None or d.area_mm2 < self.min_area_mm2):
            return False
        return d.score_max >= self.min_score

    def fires(self, defects: Sequence[Defect]) -> bool:
        return any(self.matches(d) for d in defects)


@dataclass(frozen=True, slots=True)
class CountRule:
    """More than ``max_defects`` defects with peak score >= ``min_score``."""

    max_defects: int
    min_score: float = 0.0
    cls: str | None = None

    @property
    def name(self) -> str:
        if self.min_score > 0:
            return _named(self.cls, f"count(score>={_num(self.min_score)})>{self.max_defects}")
        return _named(self.cls, f"count>{self.max_defects}")

    @property
    def needs_scale(self) -> bool:
        return False

    def fires(self, defects: Sequence[Defect]) -> bool:
        return sum(d.score_max >= self.min_score for d in _of(self.cls, defects)) > self.max_defects


@dataclass(frozen=True, slots=True)
class ScoreRule:
    """Any defect whose peak probability is >= ``min_score``."""

    min_score: float
    cls: str | None = None

    @property
    def name(self) -> str:
        return _named(self.cls, f"score>={_num(self.min_score)}")

    @property
    def needs_scale(self) -> bool:
        return False

    def fires(self, defects: Sequence[Defect]) -> bool:
        return any(d.score_max >= self.min_score for d in _of(self.cls, defects))


@dataclass(frozen=True, slots=True)
class AnyDefectRule:
    """Any defect at all (post-processing already applied threshold and minimum area)."""

    cls: str | None = None

    @property
    def name(self) -> str:
        return _named(self.cls, "any-defect")

    @property
    def needs_scale(self) -> bool:
        return False

    def fires(self, defects: Sequence[Defect]) -> bool:
        return len(_of(self.cls, defects)) > 0


def build_rule(config: RuleConfig) -> Rule:
    cls = config.class_
    if isinstance(config, AreaRuleConfig):
        return AreaRule(config.min_area_px, config.min_area_mm2, config.min_score, cls)
    if isinstance(config, CountRuleConfig):
        return CountRule(config.max_defects, config.min_score, cls)
    if isinstance(config, ScoreRuleConfig):
        return ScoreRule(config.min_score, cls)
    if isinstance(config, AnyDefectRuleConfig):
        return AnyDefectRule(cls)
    raise TypeError(f"unknown rule config {config!r}")


def build_rules(config: RulesConfig) -> tuple[Rule, ...]:
    """The rules of ``config``, in order."""
    return tuple(build_rule(c) for c in config.rules)


def check_rule_classes(config: RulesConfig, card: ModelCard) -> None:
    """``ConfigError`` naming each rule whose ``class`` the model card does not list."""
    bad = [
        f"rules.rules.{i}.class: {rule.class_!r} is not a class of model {card.name!r}"
        for i, rule in enumerate(config.rules)
        if rule.class_ is not None and rule.class_ not in card.classes
    ]
    if bad:
        raise ConfigError(f"{'; '.join(bad)} (its classes: {', '.join(card.classes)})")


def decide(rules: Sequence[Rule], defects: Sequence[Defect]) -> tuple[Verdict, str]:
    """``(FAIL, name of the first rule that fires)`` or ``(PASS, "none")``."""
    for rule in rules:
        if rule.fires(defects):
            return Verdict.FAIL, rule.name
    return Verdict.PASS, PASS_RULE
