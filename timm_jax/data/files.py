"""What a data folder's readers share: the one-line problems, the error that carries them, and
the description of a case's files (:mod:`timm_jax.data.io` reads them, :mod:`timm_jax.data.layouts`
finds them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from timm_jax.errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "CasePlan",
    "DataError",
    "ImageSource",
    "Problem",
    "describe",
    "is_case_dir",
    "list_dir",
]

#: file endings read (NIfTI through nibabel's Nifti1/2Image, MGH through MGHImage)
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".mgh")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a case: the file (or folder) concerned and what is wrong with it."""

    case_id: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DataError(UserError, ValueError):
    """Raised when a case or a data set cannot be used; the message names each file and its problem."""

    def __init__(self, problems: Sequence[Problem] | str):
        if isinstance(problems, str):
            problems = [Problem(case_id="", path="", message=problems)]
        self.problems = list(problems)
        lines = [str(p) if p.path else p.message for p in self.problems]
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """One image file of a case and the modalities it supplies.

    ``volumes`` is ``None`` for a 3-D file (one modality), or for a 4-D file the index along its
    fourth axis of each modality in ``modalities`` (``n_volumes`` is the size that axis must have,
    ``what`` says where that number comes from).
    """

    path: Path | None
    expected: Path
    modalities: tuple[str, ...]
    volumes: tuple[int, ...] | None = None
    n_volumes: int | None = None
    what: str = ""


@dataclasses.dataclass(frozen=True)
class CasePlan:
    """The files of one case: ``labels`` is ``None`` when absent (``labels_expected`` is then the file
    looked for, or ``None`` where the layout has no label file for the case: a test case)."""

    case_id: str
    folder: Path
    images: tuple[ImageSource, ...]
    labels: Path | None
    labels_expected: Path | None


# --------------------------------------------------------------------------------------- data sets


def is_case_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith((".", "_"))


def is_file(path: Path) -> bool:
    """``path.is_file()`` that is False, not an error, for names the OS refuses (too long, ...)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def list_dir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as err:
        raise DataError([Problem("", str(folder), f"cannot list folder ({describe(err)})")]) from None


def describe(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception on one line (readers' messages may span several)."""
    msg = " ".join(str(err).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__
