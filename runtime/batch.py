"""Batch generation for ``ralu-generate --prompts``: a prompts file shared out among
data-parallel processes, written to a resumable manifest.

Guarantees, and how they are kept:

- **Same images whatever the process count.**  Every image is its own pipeline call with its
  own seed, fixed by the prompts file (an explicit ``seed`` on a JSONL line, else
  ``--seed`` + the prompt's index), never by which process draws it.
- **No corrupt manifest, no duplicates, nothing lost.**  Each process appends one record per
  finished image to its own part file (flushed and fsynced after the PNG is in place, itself
  written through a temporary file and a rename).  The main process merges the part files into
  ``manifest.jsonl`` with an atomic rewrite, keyed by prompt index, and only then deletes them.
  A crash at any point leaves either a complete manifest, or part files whose worst damage is
  a torn last line (ignored: that image is simply made again).
- **Resume.**  An image counts as done when it has a record and its file exists; a rerun
  makes only the rest.  A manifest written for other prompts or settings is refused, not mixed.

accelerate is imported only when the process was started by a launcher (``torchrun``,
``accelerate launch``, ``mpirun``); a single process never needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .schedule import check_output_file, write_atomic, write_text_atomic

MANIFEST = "manifest.jsonl"
#: the lock file a run holds in its output folder (``fcntl.flock``: released when the process ends, killed or not)
LOCK = ".ralu-generate.lock"
PART_PREFIX = "manifest.part-"
#: the fields that say which image a record describes; a rerun must agree on all of them
IDENTITY = ("index", "prompt", "negative_prompt", "seed", "schedule_sha256", "parameters", "file")
#: environment variables through which launchers announce the number of processes
LAUNCHER_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
#: processes that finish their share wait at a barrier for the slowest one; shares differ by
#: at most one image, but a slow node must not turn into a collective timeout
BARRIER_TIMEOUT = timedelta(hours=6)
JSONL_KEYS = ("prompt", "seed", "negative_prompt")


@dataclass(frozen=True)
class Job:
    """One image: the prompt at ``index`` of the prompts file and its seed."""

    index: int
    prompt: str
    seed: int
    negative_prompt: str | None = None


# ----------------------------------------------------------------------------------------
# The prompts file
# ----------------------------------------------------------------------------------------


def read_prompts(path: str | os.PathLike, base_seed: int, negative_prompt: str | None = None) -> list[Job]:
    """Jobs from a prompts file: ``*.jsonl`` holds one JSON object per line (``prompt``, and
    optionally ``seed`` and ``negative_prompt``), any other file one prompt per line.  Blank
    lines are skipped; the index counts prompts.  ``negative_prompt`` is the default for lines
    without their own."""
    path = Path(path)
    try:
        regular = path.is_file() or not path.exists()
    except (OSError, ValueError):
        regular = True  # the read below names the problem
    if not regular:
        raise ValueError(f"the prompts file {str(path)!r} is not a regular file (a folder, device or FIFO). Fix: pass a UTF-8 text file, one prompt per line")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark is not part of the first prompt
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"cannot read the prompts file {str(path)!r} ({error}). Fix: pass a UTF-8 text file, one prompt per line") from None
    jsonl = path.suffix.lower() == ".jsonl"
    jobs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        fields = _jsonl_fields(line, where) if jsonl else {"prompt": line.strip()}
        for key in ("prompt", "negative_prompt"):
            problem = text_problem(fields.get(key))
            if problem is not None:
                raise ValueError(f"{where}: the {key} {problem}")
        index = len(jobs)
        seed = fields.get("seed", base_seed + index)
        if not 0 <= seed < 2**63:
            raise ValueError(f"{where}: seed {seed} (--seed {base_seed} + prompt index {index}) is not in [0, 2**63). Fix: a smaller non-negative --seed, or a seed on the line")
        jobs.append(Job(index, fields["prompt"], seed, fields.get("negative_prompt", negative_prompt)))
    if not jobs:
        raise ValueError(f"the prompts file {str(path)!r} holds no prompt. Fix: write one prompt per line")
    return jobs


def text_problem(text) -> str | None:
    """Why a prompt cannot go to a tokenizer and into a PNG's metadata, or None: a NUL byte,
    or a lone surrogate (JSON's ``"\\ud800"``, or undecodable bytes on the command line)."""
    if not isinstance(text, str):
        return None
    if "\0" in text:
        return "holds a NUL byte. Fix: remove it"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"holds {text[error.start]!r} at character {error.start}, a lone surrogate that is no Unicode character. Fix: write the character itself (UTF-8), or a surrogate pair"
    return None


def _unique_keys(pairs: list) -> dict:
    """``json`` object hook: a key given twice is refused, not silently the last one."""
    fields = {}
    for key, value in pairs:
        if key in fields:
            raise ValueError(f"the key {key!r} is given twice. Fix: keep one of them")
        fields[key] = value
    return fields


def _jsonl_fields(line: str, where: str) -> dict:
    try:
        fields = json.loads(line, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise ValueError(f'{where} is not JSON ({error.msg}). Fix: one object per line, e.g. {{"prompt": "a cat", "seed": 3}}') from None
    except RecursionError:
        raise ValueError(f'{where} is nested too deeply. Fix: one flat object per line, e.g. {{"prompt": "a cat", "seed": 3}}') from None
    except ValueError as error:  # a duplicate key, or an integer beyond Python's digit limit
        raise ValueError(f"{where}: {error}" if "Fix:" in str(error) else f"{where} is not usable JSON ({error}). Fix: one object per line") from None
    if not isinstance(fields, dict):
        raise ValueError(f'{where} is not a JSON object. Fix: one object per line, e.g. {{"prompt": "a cat", "seed": 3}}')
    unknown = sorted(set(fields) - set(JSONL_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}. Fix: use only {list(JSONL_KEYS)}")
    if not isinstance(fields.get("prompt"), str) or not fields["prompt"].strip():
        raise ValueError(f'{where} has no prompt. Fix: give each line a non-empty "prompt" string')
    seed = fields.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"{where}: seed {seed!r} is not an integer in [0, 2**63). Fix: give an integer seed or leave it out")
    if not isinstance(fields.get("negative_prompt", ""), str):
        raise ValueError(f"{where}: negative_prompt must be a string")
    return fields


def schedule_sha256(schedule) -> str:
    """A fingerprint of a schedule's content (two files with the same content agree)."""
    return hashlib.sha256(schedule.model_dump_json().encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------


def identity(record: dict) -> dict:
    return {key: record.get(key) for key in IDENTITY}


def part_path(out: Path, process_index: int) -> Path:
    return out / f"{PART_PREFIX}{process_index}.jsonl"


def part_files(out: Path) -> list[Path]:
    return sorted(out.glob(f"{PART_PREFIX}*.jsonl"))


def read_manifest(out: Path) -> list[dict]:
    """The records of ``manifest.jsonl`` (written only atomically, so any bad line is an error)."""
    path = out / MANIFEST
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            int(record["index"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{path}, line {number} is not an image record. Fix: restore the file or pass a new --out folder") from None
        records.append(record)
    return records


def read_parts(out: Path) -> list[dict]:
    """The records of the part files left by running (or crashed) processes.  A line cut short
    by a crash is skipped: its image has no record and is made again."""
    records = []
    for path in part_files(out):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            try:
                record = json.loads(line) if line.endswith("\n") else None
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("index"), int):
                records.append(record)
    return records


def completed(out: Path, expected: dict[int, dict]) -> dict[int, dict]:
    """Records of finished images, one per index, checked against what this run would write
    (``expected``: index -> identity).  Records without their image file are dropped."""
    done: dict[int, dict] = {}
    for record in read_manifest(out) + read_parts(out):
        index = record["index"]
        if index not in expected:
            raise ValueError(f"{out / MANIFEST} records image {index}, but the prompts file has only {len(expected)} prompts. Fix: pass a new --out folder, or the prompts file it was made from")
        mine, theirs = expected[index], identity(record)
        if mine != theirs:
            field = next(key for key in IDENTITY if mine[key] != theirs[key])
            raise ValueError(
                f"--out {str(out)!r} holds image {index} made with another {field} ({theirs[field]!r}, now {mine[field]!r}). "
                "Fix: pass a new --out folder, or the prompts file and settings it was made with"
            )
        if index not in done and (out / record["file"]).is_file():
            done[index] = record
    return done


def write_manifest(out: Path, records: Iterable[dict]) -> Path:
    """Rewrite ``manifest.jsonl`` atomically (sorted by index), then drop the part files it absorbed."""
    lines = [json.dumps(record, ensure_ascii=False) for record in sorted(records, key=lambda record: record["index"])]
    path = write_text_atomic(out / MANIFEST, "".join(line + "\n" for line in lines))
    for part in part_files(out):
        part.unlink(missing_ok=True)
    return path


@contextmanager
def folder_lock(out: Path):
    """Hold the output folder for this run: one live run per folder.

    An exclusive ``fcntl.flock`` on ``out/.ralu-generate.lock``, taken without waiting.  The
    kernel drops it when the process ends, however it ends (kill -9 included), so a crashed
    run never leaves the folder locked; the file itself stays (removing it would let two runs
    lock two different files).  A second run on the same folder gets a ``ValueError``.
    """
    import fcntl

    path = out / LOCK
    check_output_file(path)
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as error:
        raise ValueError(f"cannot create the lock file {path} ({error.strerror or error}). Fix: pass a writable --out folder") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another ralu-generate is writing to --out {str(out)!r} (it holds {LOCK} there). "
                "Fix: wait for it to finish (a rerun then makes only the missing images), or pass another --out folder"
            ) from None
        except OSError as error:
            raise ValueError(f"cannot lock {path} ({error.strerror or error}). Fix: pass an --out folder on a local file system") from None
        yield path
    finally:
        os.close(handle)  # releases the lock


class PartWriter:
    """Appends records to this process's part file, each one durable before the next image."""

    def __init__(self, path: Path):
        check_output_file(path)  # a FIFO would block the open, a link would be written through
        self.stream = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()
        os.fsync(self.stream.fileno())

    def close(self) -> None:
        self.stream.close()


def save_png_atomic(image, path: Path, pnginfo=None) -> None:
    """Save a PIL image through a temporary file in the same folder and a rename
    (:func:`ralu.runtime.schedule.write_atomic`: a target that is not a regular file, or is a
    symbolic link, is refused; the PNG gets the mode of ``open(path, "w")``, like the manifest)."""
    write_atomic(path, lambda stream: image.save(stream, format="PNG", pnginfo=pnginfo))


# ----------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------


@dataclass
class Processes:
    """This process's place among the launched ones."""

    index: int = 0
    count: int = 1
    device: str | None = None  # the launcher's device for this process (None: caller's choice)
    state: Any = None  # accelerate's PartialState when launched

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def wait_for_everyone(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, jobs: list) -> list:
        """This process's contiguous share of ``jobs`` (shares differ by at most one)."""
        if self.state is None:
            return list(jobs)
        with self.state.split_between_processes(list(jobs)) as mine:
            return list(mine)

    def close(self) -> None:
        import torch.distributed

        if self.state is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launched_process_count(environ=os.environ) -> int:
    """How many processes a launcher says it started (1 when there is no launcher)."""
    for name in LAUNCHER_SIZE_VARIABLES:
        value = environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return 1


def join_processes(cpu: bool) -> Processes:
    """Join the launcher's process group through accelerate's PartialState (gloo on CPU), or
    stand alone when no launcher started this process."""
    launched = launched_process_count()
    if launched <= 1:
        return Processes()
    try:
        from accelerate import PartialState
    except ImportError:
        raise ValueError(
            f"a launcher started {launched} processes, and sharing prompts among them needs accelerate. "
            "Fix: pip install 'ralu[distributed]', or run a single process"
        ) from None
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    if state.num_processes != launched:
        raise ValueError(
            f"a launcher started {launched} processes but accelerate joined {state.num_processes} "
            f"(device {state.device}). Fix: launch with torchrun or accelerate launch, and --device cpu on machines without GPUs"
        )
    return Processes(state.process_index, state.num_processes, str(state.device), state)


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    made: list[dict]  # records of the images this process made
    skipped: int  # images already there before this run
    manifest: Path | None  # written by the main process


def run_batch(
    jobs: list[Job],
    out: Path,
    processes: Processes,
    file_name: Callable[[Job], str],
    common: dict,
    make_renderer: Callable[[], Callable[[Job], tuple[Any, Any, float]]],
    progress: bool = True,
) -> BatchResult:
    """Make every job's image that ``out`` does not hold yet, sharing the work among processes.

    ``common``: the record fields shared by all images (schedule, schedule_sha256, parameters).
    ``make_renderer()`` is called only by processes that have work (it loads the pipeline);
    its renderer turns a job into ``(PIL image, PngInfo, seconds)``.
    """
    expected = {job.index: identity(_record(job, file_name(job), common)) for job in jobs}
    done = completed(out, expected)  # every process reads and checks the same files
    processes.wait_for_everyone()  # ... before the main process rewrites them
    manifest = None
    if processes.is_main:
        manifest = write_manifest(out, done.values())
        _remove_stale_temporaries(out)
    processes.wait_for_everyone()

    todo = [job for job in jobs if job.index not in done]
    for job in todo:  # a file name taken by a FIFO, device, folder or link: refused before any image is made
        check_output_file(out / file_name(job))
    mine = processes.share(todo)
    render = make_renderer() if mine else None
    bar = _progress_bar(len(todo), len(done), progress and processes.is_main and bool(todo))
    made = []
    if mine:
        writer = PartWriter(part_path(out, processes.index))
        try:
            for job in mine:
                image, pnginfo, seconds = render(job)
                record = _record(job, file_name(job), common, seconds)
                save_png_atomic(image, out / record["file"], pnginfo)
                writer.append(record)
                made.append(record)
                if bar is not None:
                    bar.n = _records_written(out)
                    bar.refresh()
        finally:
            writer.close()
    processes.wait_for_everyone()
    if processes.is_main:
        manifest = write_manifest(out, completed(out, expected).values())
        if bar is not None:
            bar.n = len(todo)
            bar.close()
    return BatchResult(made, len(done), manifest)


def _record(job: Job, file: str, common: dict, seconds: float | None = None) -> dict:
    record = {"index": job.index, "prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed}
    record.update(common)
    record["file"] = file
    record["seconds"] = None if seconds is None else round(seconds, 4)
    return record


def _records_written(out: Path) -> int:
    # Finished lines in all part files: every process's progress, without any communication.
    return sum(part.read_bytes().count(b"\n") for part in part_files(out))


def _remove_stale_temporaries(out: Path) -> None:
    # Temporary PNGs of a crashed run (never renamed into place); only the main process
    # removes them, between barriers, while no image is being written.
    for temporary in out.glob(".*.png.*.tmp"):
        temporary.unlink(missing_ok=True)


def _progress_bar(total: int, skipped: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="images", unit="image", postfix={"already done": skipped} if skipped else None)
