"""Where the testbed's trained weights are.

The transformer and classifier (about 11 MB of safetensors with their training records) are
repository data, not package data: they live in the repository's ``testbed-weights/`` folder,
beside ``calibrate/``, so that installing the package (whose users want the runtime) does not
carry them.  The offline tools that need them (evaluation, ``ralu-bench quality``, the tests,
the README's testbed example) look, in this order:

1. at a folder given explicitly (``path=`` in the API, ``--weights`` / ``--classifier`` in the
   command lines): the transformer or classifier folder itself;
2. at ``$RALU_TESTBED_WEIGHTS``: a folder laid out like ``testbed-weights/`` (``transformer/``
   and ``classifier/``);
3. at ``testbed-weights/`` of the checkout this file belongs to (an editable install, or Python
   run from the checkout).

An installed wheel has no checkout beside it, so without 1 or 2 the tools stop with one line
saying where the weights live and how to point at them.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The folder's name at the repository root.
REPOSITORY_FOLDER = "testbed-weights"
#: Environment variable naming a folder laid out like ``testbed-weights/``.
ENV_VAR = "RALU_TESTBED_WEIGHTS"
#: Where the folder is when this file is part of a checkout (calibrate/testbed/ -> the root).
CHECKOUT_FOLDER = Path(__file__).resolve().parents[2] / REPOSITORY_FOLDER
#: The subfolders: the generator (diffusers format) and the classifier.
TRANSFORMER, CLASSIFIER = "transformer", "classifier"


class WeightsNotFound(FileNotFoundError):
    """No testbed weights where they were looked for (the message names the fix)."""


def weights_dir() -> Path:
    """The folder holding ``transformer/`` and ``classifier/`` (steps 2 and 3 above)."""
    env = os.environ.get(ENV_VAR)
    if env:
        folder = Path(env).expanduser()
        if not folder.is_dir():
            raise WeightsNotFound(
                f"{ENV_VAR}={env} is not a folder. Fix: point it at a copy of the repository's {REPOSITORY_FOLDER}/ "
                f"folder (with {TRANSFORMER}/ and {CLASSIFIER}/), or unset it inside a checkout"
            )
        return folder
    if CHECKOUT_FOLDER.is_dir():
        return CHECKOUT_FOLDER
    raise WeightsNotFound(
        f"no testbed weights: they are not part of the installed package but live in the {REPOSITORY_FOLDER}/ folder "
        f"of the ralu repository. Fix: use a checkout (pip install -e .), set {ENV_VAR} to that folder, "
        "or pass the transformer and classifier folders (--weights, --classifier)"
    )


def transformer_dir(path: str | Path | None = None) -> Path:
    """The generator's folder (diffusers format): ``path`` if given, else the default one."""
    return Path(path) if path is not None else weights_dir() / TRANSFORMER


def classifier_dir(path: str | Path | None = None) -> Path:
    """The classifier's folder: ``path`` if given, else the default one."""
    return Path(path) if path is not None else weights_dir() / CLASSIFIER


def describe(part: str, path: str | Path | None = None) -> str:
    """How a report names the folder ``part`` (``"transformer"``, ``"classifier"``, or testbed v2's ``"v2/<part>"``) comes from.

    The repository's folder by its path in the repository (reports are committed: this
    machine's absolute path would mean nothing elsewhere); other folders as given.
    """
    if path is not None:
        return str(path)
    folder = weights_dir()
    if folder.resolve() == CHECKOUT_FOLDER:
        return f"{REPOSITORY_FOLDER}/{part} (repository)"
    return f"{folder / part} (${ENV_VAR})"
