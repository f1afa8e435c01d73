"""What ``ralu-calibrate`` and ``ralu-plot`` share: errors on one line, and checks on the
files they will write, made before the work that produces them (a calibration that runs
for minutes must not end in "cannot write the result")."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import NoReturn

from ralu.runtime.schedule import check_output_file


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit 2), like every other error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def one_line(error: BaseException) -> str:
    """An error's message on one line (schedule errors list one field per line)."""
    return " ".join(str(error).split()) or type(error).__name__


def check_writable(path: Path, option: str) -> None:
    """Raise ``ValueError`` naming ``option`` unless ``path`` can be written: not a folder, device, FIFO or symbolic link,
    and its folder (or the nearest existing folder above it, which the writer will create
    the rest under) accepts a new file.  Probed by creating and removing a temporary file,
    since permission bits do not tell the whole story (root, read-only mounts)."""
    path = Path(path)
    check_output_file(path, option)  # a device, FIFO, folder or symbolic link; before any probe
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: {folder} is not a folder. Fix: choose a path inside a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{path.name[:120]}.", suffix=".probe", dir=folder)
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot create files in {folder} ({error.strerror}). Fix: choose a writable folder") from None
    os.close(handle)
    os.unlink(probe)
