"""Where testbed v2's trained weights are: ``testbed-weights/v2/`` beside v1's folders.

The same lookup as v1 (:mod:`ralu.calibrate.testbed.location`): an explicit folder first,
then ``$RALU_TESTBED_WEIGHTS`` (a folder laid out like ``testbed-weights/``, holding ``v2/``),
then the checkout's ``testbed-weights/``.  Weights are repository data, never package data.
Inside ``v2/`` each network has its folder (:data:`PARTS`), each with a ``training.json``
naming the command that made it.
"""

from __future__ import annotations

from pathlib import Path

from ..location import REPOSITORY_FOLDER, WeightsNotFound, weights_dir
from ..location import describe as describe_folder

#: The v2 subfolder of the weights folder.
VERSION_FOLDER = "v2"
#: Subfolders of ``v2/``: the autoencoder (diffusers format), the classifier, the FLUX and
#: the SD3 generator (diffusers format).
AUTOENCODER, CLASSIFIER, FLUX, SD3 = "autoencoder", "classifier", "flux", "sd3"
PARTS: tuple[str, ...] = (AUTOENCODER, CLASSIFIER, FLUX, SD3)

__all__ = ["AUTOENCODER", "CLASSIFIER", "FLUX", "PARTS", "SD3", "WeightsNotFound", "default_out", "describe", "part_dir"]


def part_dir(part: str, path: str | Path | None = None) -> Path:
    """The folder of ``part`` (one of :data:`PARTS`): ``path`` if given, else the default one."""
    if part not in PARTS:
        raise ValueError(f"unknown testbed v2 part {part!r}. Fix: use one of {PARTS}")
    return Path(path) if path is not None else weights_dir() / VERSION_FOLDER / part


def default_out(part: str) -> Path:
    """Where a training command writes ``part`` by default: the repository's folder, relative
    to the working directory (run it from the repository root)."""
    return Path(REPOSITORY_FOLDER) / VERSION_FOLDER / part


def describe(part: str, path: str | Path | None = None) -> str:
    """How a report names where ``part``'s folder comes from (v1's rule,
    :func:`ralu.calibrate.testbed.location.describe`, for ``v2/<part>``): the repository's
    folder by its path in the repository, ``$RALU_TESTBED_WEIGHTS``'s as such, a given folder
    as given."""
    return describe_folder(f"{VERSION_FOLDER}/{part}", path)
