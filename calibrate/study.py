"""The Optuna study behind the outer layout search, shared by any number of worker processes.

Several ``ralu-calibrate --storage URL --study-name NAME`` processes (on one machine or
several) work on one study:

* ``--trials N`` counts the study's finished trials: every worker stops once the study has
  N, so a rerun resumes an interrupted study and extra workers share the same budget.
* A parameter set (one layout) is evaluated at most once per study.  Optuna storages have
  no compare-and-set, so a trial first records the layout it drew (user attribute
  ``layout``) and then looks at every earlier-numbered trial: one that finished with the
  same layout lends its value (the trial records ``same_as``, nothing is recomputed); one
  still running with the same layout, or one that has not recorded its layout yet, is
  waited for.  A trial only ever waits for lower numbers, so two workers cannot wait for
  each other, and of two twins the later one always sees the earlier one's record.
* A worker that dies (SIGKILL, a lost machine) leaves its trial RUNNING.  Every running
  trial records a heartbeat; one silent for ``GRACE_PERIOD`` seconds is marked FAIL by the
  next worker that starts a trial or waits (Optuna's own heartbeat for database storages,
  the same protocol on a trial attribute for journal files).  Clocks of the machines
  sharing a journal file must agree to within the grace period.
* Before summarising, a worker waits until no trial of the study is running, then counts
  the study's first N finished trials by number (N = ``--trials``, or the finished trials it
  found when it started if that is more).  A worker that was still between two trials when
  another's wait ended starts one numbered past those, so every worker reports the same
  trials and writes the same schedule.
* Each worker's sampler draws trial ``n``'s random numbers from ``(seed, n)``: workers on
  one study explore different layouts, and a single worker is deterministic for a seed.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

#: Seconds between heartbeats of a running trial.
HEARTBEAT_INTERVAL = 5
#: A running trial silent this long belongs to a dead worker and is marked FAIL.
GRACE_PERIOD = 30
#: Seconds between looks at the storage while waiting for other workers' trials.
POLL_INTERVAL = 0.2
#: User attribute holding the layout a trial drew; trials with equal values are twins.
LAYOUT_ATTR = "layout"
#: User attribute of a twin: the number of the trial whose value it reuses.
SAME_AS_ATTR = "same_as"
_HEARTBEAT_ATTR = "ralu:heartbeat"

#: SQLAlchemy dialects Optuna's RDB storage can use, as URL schemes (``dialect+driver://``).
_RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")
STORAGE_FORMS = "a journal file (FILE.log, FILE.jsonl or journal:FILE) or a database URL (sqlite:///FILE.db, postgresql://USER@HOST/DB)"


class _JournalFileStorage(JournalStorage, BaseHeartbeat):
    """A journal file storage with heartbeats, so that dead workers' trials get failed."""

    def __init__(self, path: str, heartbeat_interval: int, grace_period: int):
        super().__init__(JournalFileBackend(path))
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, _HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # failed by another worker as stale; the trial's own tell reports that

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(_HEARTBEAT_ATTR)
            if beat is None:
                beat = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - beat > self._grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable | None:
        return None

    def get_failed_trial_callback(self) -> Callable | None:  # the name before Optuna 4.9
        return None


class _TrialSeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random draws for trial ``n`` depend only on ``(seed, n)``."""

    def __init__(self, seed: int, **options):
        super().__init__(seed=seed, **options)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial_seed = int(np.random.SeedSequence([self._base_seed, trial.number]).generate_state(1)[0])
        try:
            self._rng.rng.seed(trial_seed)
            self._random_sampler._rng.rng.seed(trial_seed)
        except AttributeError:  # another Optuna's internals: still distinct per trial, not seeded
            self.reseed_rng()
        super().before_trial(study, trial)


def open_storage(storage: str) -> BaseStorage:
    """The storage a ``--storage`` value names, with heartbeats; ``ValueError`` naming the
    problem and the fix when it cannot be opened."""
    if not isinstance(storage, str) or not storage.strip():
        raise ValueError(f"storage {storage!r} is empty. Fix: give {STORAGE_FORMS}")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", storage)
    if storage.startswith("journal:") or (scheme is None and storage.endswith((".log", ".jsonl"))):
        return _open_journal(storage.removeprefix("journal:"))
    if scheme is None or scheme.group(1).split("+")[0].lower() not in _RDB_SCHEMES:
        raise ValueError(f"storage {storage!r} is neither a journal file nor a database URL. Fix: give {STORAGE_FORMS}")
    if storage.startswith("sqlite:///") and storage != "sqlite:///:memory:":
        _check_folder(storage.removeprefix("sqlite:///"), storage)
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
                return optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD)
        except Exception as error:  # SQLAlchemy's errors: a bad URL, a missing driver, no server
            if _creation_race(error) and attempt + 1 < _CREATE_ATTEMPTS:
                time.sleep(0.5 * (attempt + 1))
                continue
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
            raise ValueError(f"cannot open storage {storage!r}: {first_line}. Fix: check the URL, the database server and its Python driver") from None
    raise AssertionError("unreachable")


#: Workers that start together race to create a new database's tables; the losers retry.
_CREATE_ATTEMPTS = 5


def _creation_race(error: Exception) -> bool:
    message = str(error)
    return "UNIQUE constraint failed" in message or "already exists" in message or "database is locked" in message


def _check_folder(path: str, storage: str) -> None:
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"storage {storage!r} is a folder. Fix: name a file in it, e.g. {file / 'study.log'}")
    if not file.parent.is_dir():
        raise ValueError(f"storage {storage!r}: folder {file.parent} does not exist. Fix: create it, or choose a file in an existing folder")


def _open_journal(path: str) -> BaseStorage:
    _check_folder(path, path)
    try:
        return _JournalFileStorage(path, HEARTBEAT_INTERVAL, GRACE_PERIOD)
    except OSError as error:
        raise ValueError(f"cannot open journal storage {path!r}: {error.strerror}. Fix: choose a writable file") from None


def open_study(storage: str | None, study_name: str | None, seed: int, pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """A minimising study: in memory, or shared through ``storage`` (see the module docstring).
    ``pruner`` (default none) stops trials that report clearly bad intermediate values."""
    if storage is None:
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=16)
        return optuna.create_study(direction="minimize", sampler=sampler, study_name=study_name, pruner=pruner or optuna.pruners.NopPruner())
    if not study_name:
        raise ValueError("--storage needs --study-name, so that several processes (or a resumed run) find the same study")
    sampler = _TrialSeededTPESampler(seed, multivariate=True, n_startup_trials=16)
    study = optuna.create_study(direction="minimize", sampler=sampler, study_name=study_name, storage=open_storage(storage), load_if_exists=True, pruner=pruner or optuna.pruners.NopPruner())
    fail_stale_trials(study)
    return study


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark the running trials of dead workers FAIL (no-op without heartbeats)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def count(study: optuna.Study, state: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


def find_twin(trial: optuna.Trial, layout: str) -> FrozenTrial | None:
    """Record ``layout`` as the trial's parameter set and return an earlier finished trial
    with the same one, waiting for earlier trials that may still become one (see the
    module docstring); None when this trial has to evaluate the layout itself."""
    trial.set_user_attr(LAYOUT_ATTR, layout)
    study = trial.study
    while True:
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        done = [t for t in earlier if t.state == TrialState.COMPLETE and t.user_attrs.get(LAYOUT_ATTR) == layout]
        if done:
            return min(done, key=lambda t: t.number)
        # A running trial without a recorded layout has not finished drawing: it may be a twin.
        if not any(t.state == TrialState.RUNNING and t.user_attrs.get(LAYOUT_ATTR, layout) == layout for t in earlier):
            return None
        fail_stale_trials(study)
        time.sleep(POLL_INTERVAL)


def wait_for_running(study: optuna.Study, log: Callable[[str], None]) -> None:
    """Return once no trial of the study runs: other workers' trials finish or go stale."""
    announced = False
    while running := count(study, TrialState.RUNNING):
        if not announced:
            log(f"waiting for {running} running trial(s) of other workers (a dead worker's trial is marked failed after {GRACE_PERIOD} s without a heartbeat)")
            announced = True
        fail_stale_trials(study)
        time.sleep(POLL_INTERVAL)


@contextlib.contextmanager
def stop_on_ctrl_c(study: optuna.Study):
    """The first Ctrl-C lets the running trial finish and be stored, then raises
    ``KeyboardInterrupt``; a second one interrupts at once.  An interrupt in the middle of
    Optuna's storage writes would leave the trial RUNNING (and Optuna raising a second
    error while handling the first)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []

    def on_ctrl_c(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)
        study.stop()

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt
