"""Update validation before aggregation: a list of small validators.

Per-update validators have ``check(update, vec, ctx) -> None | reason``;
`build_validators` assembles them from configuration.  The relative norm bound
needs the whole cohort and is a filter over the cohort's norms
(`RelativeNormFilter`, `filter_by_relative_norm`).
"""

from .validators import (
    DEFAULT_VALIDATORS,
    VALIDATORS,
    DuplicateValidator,
    ExampleCountCapValidator,
    ExampleCountValidator,
    FiniteValidator,
    NormBoundValidator,
    RelativeNormFilter,
    RoundValidator,
    ShapeValidator,
    StalenessValidator,
    ValidationContext,
    build_validators,
    default_validators,
    filter_by_relative_norm,
    update_norm,
)

__all__ = [
    "DEFAULT_VALIDATORS",
    "VALIDATORS",
    "DuplicateValidator",
    "ExampleCountCapValidator",
    "ExampleCountValidator",
    "FiniteValidator",
    "NormBoundValidator",
    "RelativeNormFilter",
    "RoundValidator",
    "ShapeValidator",
    "StalenessValidator",
    "ValidationContext",
    "build_validators",
    "default_validators",
    "filter_by_relative_norm",
    "update_norm",
]
