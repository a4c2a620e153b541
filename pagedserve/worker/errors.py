"""Worker failures, as the engine sees them."""

from __future__ import annotations


class WorkerFailedError(RuntimeError):
    """A worker died or raised; the engine cannot step any more."""

    def __init__(self, rank: int | None, detail: str) -> None:
        super().__init__(rank, detail)  # the args rebuild it when Ray pickles it
        self.rank, self.detail = rank, detail

    def __str__(self) -> str:
        who = ("tensor-parallel workers" if self.rank is None
               else f"tensor-parallel worker rank {self.rank}")
        return f"{who} failed in {self.detail}"
