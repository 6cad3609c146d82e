"""The one exception class for bad checkpoint input (release dirs and INT2 dirs)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One defect: the file, the tensor (or "" for whole-file problems) and what is wrong."""
    file: str
    tensor: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.tensor}" if self.tensor else self.file
        return f"{where}: {self.message}"


class CheckpointError(ValueError):
    """A checkpoint directory does not match what the config/format requires.

    ``problems`` lists every defect found (file, tensor, message); ``str(err)`` names the first
    few with their file and tensor.
    """

    def __init__(self, problems: list[Problem] | Problem, root: str | Path | None = None):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        self.root = str(root) if root is not None else None
        head = f"{self.root}: " if self.root else ""
        lines = [str(p) for p in self.problems[:10]]
        more = len(self.problems) - len(lines)
        tail = f"\n  … and {more} more" if more > 0 else ""
        n = len(self.problems)
        super().__init__(f"{head}{n} checkpoint problem{'s' if n != 1 else ''}:\n  " + "\n  ".join(lines) + tail)

    @property
    def first(self) -> Problem:
        return self.problems[0]
