"""Operations: the run store and checkpoints (model registry, canaries and rollback build on it)."""

from .store import RunStore, StoreError, list_runs, new_run_id
from .registry import TAGS, ModelRegistry, ModelVersion  # noqa: E402  (after the store: it adds tables to its metadata)

__all__ = ["TAGS", "ModelRegistry", "ModelVersion", "RunStore", "StoreError", "list_runs", "new_run_id"]
