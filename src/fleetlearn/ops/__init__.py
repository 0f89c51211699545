"""Operations: the run store and checkpoints (model registry, canaries and rollback build on it)."""

from .store import RunStore, StoreError, list_runs, new_run_id

__all__ = ["RunStore", "StoreError", "list_runs", "new_run_id"]
