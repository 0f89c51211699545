"""The round engine: Coordinator, virtual clock, evaluation, and the factory of parts."""

from .clock import VirtualClock
from .coordinator import Coordinator, RoundHook
from .evaluation import Evaluator
from .canary import build_run
from .factory import build_coordinator, build_learner

__all__ = ["Coordinator", "Evaluator", "RoundHook", "VirtualClock", "build_coordinator", "build_learner", "build_run"]
