"""Update validation before aggregation: a list of small validators."""

from .validators import (
    DuplicateValidator,
    ExampleCountValidator,
    FiniteValidator,
    RoundValidator,
    ShapeValidator,
    ValidationContext,
    default_validators,
)

__all__ = [
    "DuplicateValidator",
    "ExampleCountValidator",
    "FiniteValidator",
    "RoundValidator",
    "ShapeValidator",
    "ValidationContext",
    "default_validators",
]
