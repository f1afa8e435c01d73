"""Where testbed v2's trained weights are: ``lab/testbed-weights/v2/``.

The weights (about 26 MB of safetensors with their training records) are repository data,
not package data: they live in the repository's ``lab/testbed-weights/`` folder, beside the
lab's code (``lab/ralu_lab/``), so that installing a package (the product's users want the
runtime) does not carry them.  The offline tools that need them (evaluation, ``ralu-bench quality``, the tests) look,
in this order:

1. at a folder given explicitly (``path=`` in the API, ``--weights-dir`` in the command
   lines): the part's folder itself;
2. at ``$RALU_TESTBED_WEIGHTS``: a folder laid out like ``lab/testbed-weights/`` (holding ``v2/``);
3. at ``lab/testbed-weights/`` of the checkout this file belongs to (an editable install, or
   Python run from the checkout).

An installed wheel has no checkout beside it, so without 1 or 2 the tools stop with one line
saying where the weights live and how to point at them.  Inside ``v2/`` each network has its
folder (:data:`PARTS`), each with a ``training.json`` naming the command that made it.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The folder's path in the repository.
REPOSITORY_FOLDER = "lab/testbed-weights"
#: Environment variable naming a folder laid out like ``lab/testbed-weights/``.
ENV_VAR = "RALU_TESTBED_WEIGHTS"
#: Where the folder is when this file is part of a checkout (lab/ralu_lab/testbed/v2/ -> the root).
CHECKOUT_FOLDER = Path(__file__).resolve().parents[4] / REPOSITORY_FOLDER


class WeightsNotFound(FileNotFoundError):
    """No testbed weights where they were looked for (the message names the fix)."""


#: The v2 subfolder of the weights folder.
VERSION_FOLDER = "v2"
#: Subfolders of ``v2/``: the autoencoder (diffusers format), the classifier, the FLUX and
#: the SD3 generator (diffusers format).
AUTOENCODER, CLASSIFIER, FLUX, SD3 = "autoencoder", "classifier", "flux", "sd3"
PARTS: tuple[str, ...] = (AUTOENCODER, CLASSIFIER, FLUX, SD3)

__all__ = ["AUTOENCODER", "CLASSIFIER", "ENV_VAR", "FLUX", "PARTS", "REPOSITORY_FOLDER", "SD3", "WeightsNotFound", "default_out", "describe", "part_dir", "weights_dir"]


def weights_dir() -> Path:
    """The folder holding ``v2/`` (steps 2 and 3 above)."""
    env = os.environ.get(ENV_VAR)
    if env:
        folder = Path(env).expanduser()
        if not folder.is_dir():
            raise WeightsNotFound(
                f"{ENV_VAR}={env} is not a folder. Fix: point it at a copy of the repository's {REPOSITORY_FOLDER}/ "
                f"folder (with {VERSION_FOLDER}/), or unset it inside a checkout"
            )
        return folder
    if CHECKOUT_FOLDER.is_dir():
        return CHECKOUT_FOLDER
    raise WeightsNotFound(
        f"no testbed weights: they are not part of the installed package but live in the {REPOSITORY_FOLDER}/ folder "
        f"of the ralu repository. Fix: use a checkout (pip install -e ./lab), set {ENV_VAR} to that folder, "
        "or pass the weights folder (--weights-dir)"
    )


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
    """How a report names where ``part``'s folder comes from: the repository's folder by its
    path in the repository (reports are committed: this machine's absolute path would mean
    nothing elsewhere), ``$RALU_TESTBED_WEIGHTS``'s as such, a given folder as given."""
    if path is not None:
        return str(path)
    folder = weights_dir()
    if folder.resolve() == CHECKOUT_FOLDER:
        return f"{REPOSITORY_FOLDER}/{VERSION_FOLDER}/{part} (repository)"
    return f"{folder / VERSION_FOLDER / part} (${ENV_VAR})"
