"""What the three training commands of testbed v2 share: arguments, the resumable loop,
checkpoints and the record written beside the weights.

A run is a pure function of its arguments: the data of step s comes from the seed
:func:`step_seed` ``(seed, s, part)``, every other random number (noise, noise levels,
augmentation, dropout) from one ``torch.Generator`` seeded with ``--seed``.  A checkpoint
(``<out>/checkpoint.pt``: step, weights, EMA, optimizer, that generator's state, the loss
log and the time spent) therefore lets ``--resume`` continue exactly where a run stopped:
a run cut anywhere and resumed ends with the same weights as one left alone (the tests
check it).  ``--stop-after N`` ends a session after N more steps (a checkpoint is written),
so a long training can be spread over several sessions.  Resuming refuses a checkpoint made
with other arguments (only the bookkeeping ones in :data:`RESUME_FREE` may change).

Every file is written to a temporary name in its folder and moved into place, so an
interrupted run never leaves a half-written checkpoint or record.  At the end the command
writes the weights, ``training.json`` (:func:`record`: the command, the arguments, steps,
wall and CPU time over all sessions, the loss log) and removes the checkpoint unless
``--keep-checkpoint`` (checkpoints hold the optimizer: 3-4x the weights, not repository data).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: The checkpoint's file name inside the output folder.
CHECKPOINT = "checkpoint.pt"
#: The record's file name inside the output folder.
RECORD = "training.json"
#: Arguments that may differ between the sessions of one run (``out``: a checkpoint may be
#: moved to another folder; ``device``: a run may move
#: between CPU and GPU; its data and random numbers come from the CPU either way).
RESUME_FREE = frozenset({"resume", "stop_after", "threads", "save_every", "log_every", "keep_checkpoint", "device", "out"})


class TrainingError(Exception):
    """A command-line problem: printed as one line, exit code 2."""


def step_seed(seed: int, step: int, part: int) -> int:
    """Data seed of one batch (part: which batch of the step); far from small evaluation seeds."""
    return 1_000_000_007 * (seed + 1) + 8 * step + part


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def add_common_arguments(parser: argparse.ArgumentParser, out: Path | None, steps: int, lr: float, warmup: int) -> None:
    where = "the repository's lab/testbed-weights/v2/<part>" if out is None else out
    parser.add_argument("--out", type=Path, default=out, help=f"output folder (default: {where}, from the repository root)")
    parser.add_argument("--steps", type=positive_int, default=steps, help="total optimizer steps of the run")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate (linear warm-up, cosine decay to 10 %%)")
    parser.add_argument("--warmup", type=positive_int, default=warmup)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt (start fresh if there is none)")
    parser.add_argument("--stop-after", type=positive_int, default=None, help="end this session after N more steps, writing a checkpoint")
    parser.add_argument("--save-every", type=positive_int, default=200, help="write a checkpoint every N steps")
    parser.add_argument("--log-every", type=positive_int, default=25)
    parser.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint.pt after the last step")


def command_line(prog: str, argv: list[str] | None) -> str:
    return f"python -m {prog} " + shlex.join(sys.argv[1:] if argv is None else argv)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """EMA of the weights with the usual warm start (short memory early on)."""
    rate = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p, 1.0 - rate)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)`` and move the result onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def plain_args(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


@dataclass
class TrainState:
    """Everything a checkpoint holds."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    ema: torch.nn.Module | None = None
    step: int = 0
    #: Mean losses of every logging window: ``{"step": s, name: value, ...}``.
    history: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    sessions: int = 0
    #: Loss sums and count of the logging window in progress (so a resumed log is the same).
    window: dict = field(default_factory=dict)
    count: int = 0

    def to_checkpoint(self, args: argparse.Namespace) -> dict:
        return {
            "args": plain_args(args),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "history": self.history,
            "wall_seconds": self.wall_seconds,
            "cpu_seconds": self.cpu_seconds,
            "sessions": self.sessions,
            "window": self.window,
            "count": self.count,
        }

    def load_checkpoint(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.generator.set_state(checkpoint["generator"])
        self.step = checkpoint["step"]
        self.history = checkpoint["history"]
        self.wall_seconds, self.cpu_seconds = checkpoint["wall_seconds"], checkpoint["cpu_seconds"]
        self.sessions = checkpoint["sessions"]
        self.window, self.count = checkpoint["window"], checkpoint["count"]


def check_resumable(saved: dict, args: argparse.Namespace, path: Path) -> None:
    current = plain_args(args)
    changed = sorted(k for k in set(saved) | set(current) if k not in RESUME_FREE and saved.get(k) != current.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise TrainingError(f"{path} was made with other arguments ({detail}). Fix: resume with the recorded arguments, or remove the checkpoint to start over")


def record(state: TrainState, args: argparse.Namespace, command: str, extra: dict) -> dict:
    """``training.json``: how the weights were made, enough to make them again."""
    parameters = sum(p.numel() for p in state.model.parameters())
    return {
        "command": command,
        "args": plain_args(args),
        "steps_done": state.step,
        "sessions": state.sessions,
        "wall_seconds": round(state.wall_seconds, 1),
        # CPU time / threads estimates the wall time on idle cores (the wall time includes
        # waiting for other processes on a shared machine).
        "cpu_seconds": round(state.cpu_seconds, 1),
        "seconds_per_step": round(state.wall_seconds / max(1, state.step), 3),
        "final_losses": state.history[-1] if state.history else {},
        "losses": state.history,
        "parameters": parameters,
        "weights": "EMA" if state.ema is not None else "final",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
        "machine": {"platform": platform.platform(), "threads": args.threads},
        **extra,
    }


def run(
    args: argparse.Namespace,
    state: TrainState,
    step_fn: Callable[[int], dict[str, float]],
    save_weights: Callable[[Path], None],
    command: str,
    extra: dict,
    name: str,
) -> int:
    """The loop: resume if asked, ``step_fn(step)`` (one optimizer step, returns its losses)
    up to ``--steps``, checkpoints, the log, and at the end ``save_weights(out)`` and the record."""
    checkpoint_path = args.out / CHECKPOINT
    if checkpoint_path.is_file():
        if not args.resume:
            raise TrainingError(f"{checkpoint_path} exists. Fix: pass --resume to continue that run, or remove it to start over")
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        check_resumable(saved["args"], args, checkpoint_path)
        state.load_checkpoint(saved)
        print(f"resumed {name} at step {state.step}/{args.steps} from {checkpoint_path}", flush=True)
    if state.step > args.steps:
        raise TrainingError(f"the checkpoint is at step {state.step}, past --steps {args.steps}. Fix: pass --steps {state.step} or more")
    print(f"{command}\n{name}: {sum(p.numel() for p in state.model.parameters()) / 1e6:.2f}M parameters, {args.steps} steps", flush=True)

    state.sessions += 1
    start_wall, start_cpu = time.time(), time.process_time()
    wall0, cpu0 = state.wall_seconds, state.cpu_seconds
    last = args.steps if args.stop_after is None else min(args.steps, state.step + args.stop_after)

    def sync_time() -> None:
        state.wall_seconds = wall0 + time.time() - start_wall
        state.cpu_seconds = cpu0 + time.process_time() - start_cpu

    def save_checkpoint() -> None:
        sync_time()
        atomic_write(checkpoint_path, lambda tmp: torch.save(state.to_checkpoint(args), tmp))

    while state.step < last:
        lr = learning_rate(state.step, args.steps, args.lr, args.warmup)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        losses = step_fn(state.step)
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingError(f"{name}: loss is not finite at step {state.step} ({losses}). Fix: lower --lr")
        state.step += 1
        for key, value in losses.items():
            state.window[key] = state.window.get(key, 0.0) + value
        state.count += 1
        if state.step % args.log_every == 0 or state.step == args.steps:
            entry = {"step": state.step, **{k: round(v / state.count, 5) for k, v in state.window.items()}}
            state.history.append(entry)
            state.window, state.count = {}, 0
            sync_time()
            eta = state.wall_seconds / state.step * (args.steps - state.step) if state.step else 0.0
            print(f"step {state.step}/{args.steps} " + " ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "step")
                  + f" lr {lr:.2e} {state.wall_seconds / 60:.1f} min (eta {eta / 60:.1f} min)", flush=True)
        if state.step % args.save_every == 0 and state.step < args.steps:
            save_checkpoint()
    if state.step < args.steps:
        save_checkpoint()
        print(f"stopped at step {state.step}/{args.steps}; continue with the same command and --resume", flush=True)
        return 0
    sync_time()
    save_weights(args.out)
    atomic_write_text(args.out / RECORD, json.dumps(record(state, args, command, extra), indent=2) + "\n")
    if not args.keep_checkpoint:
        checkpoint_path.unlink(missing_ok=True)
    else:
        save_checkpoint()
    print(f"saved {name} to {args.out} after {state.wall_seconds / 60:.1f} min", flush=True)
    return 0


def main_guard(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; a :class:`TrainingError` becomes one line on stderr and exit code 2."""
    try:
        return main(argv)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
