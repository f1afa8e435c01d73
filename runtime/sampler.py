"""The RALU sampling loop, independent of the model family.

A pipeline supplies a :class:`StageModel` (how to get a velocity for a token sequence, how
to decode a half-size latent for edge detection); :func:`run_stages` does the rest:

1. start from the first stage's canvas (see :func:`ralu.runtime.tokens.initial_canvas`);
2. per stage, Euler steps ``x <- x + v * (sigma_next - sigma)`` on the stage's own sigma
   grid, on the stage's token sequence (batch stays one dense tensor);
3. after the low-res stage, if a mixed stage follows: Tweedie estimate, decode, Canny, top-k
   tokens per image;
4. between stages: scatter the tokens to the canvas (= nearest upsampling), re-noise with
   :func:`ralu.runtime.noise.renoise` (one fixed-shape N(0, I) draw per image from the
   caller's generator), gather the next stage's tokens.

The state is kept in float32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch

from .compat import PaperCompat
from .edges import CANNY_THRESHOLDS, select_edge_tokens, tweedie
from .noise import renoise
from .plan import Plan, StagePlan
from .profiling import section
from .tokens import TokenLayout

#: ``velocity(patches (B, N, C, 2, 2) float32, sigma) -> (B, N, C, 2, 2)``
Velocity = Callable[[torch.Tensor, float], torch.Tensor]


class StageModel(Protocol):
    """What a model family provides to :func:`run_stages`."""

    def stage(self, layout: TokenLayout, stage: StagePlan) -> AbstractContextManager[Velocity]:
        """Prepare one stage (positions, caches) and yield its velocity function."""

    def decode_for_edges(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode a half-size latent ``(B, C, H/2, W/2)`` to images ``(B, 3, h, w)`` in [-1, 1]."""


@dataclass(frozen=True)
class StepInfo:
    """Where the loop is, handed to the per-step hook."""

    stage_index: int
    stage_step: int
    step: int
    sigma: float
    sigma_next: float
    role: str
    num_stages: int
    stage_steps: int
    total_steps: int


@dataclass
class Result:
    canvas: torch.Tensor
    layout: TokenLayout
    #: ``(B, k)`` low-res tokens upsampled early, or None without a mixed stage.
    selected: torch.Tensor | None
    interrupted: bool


def draw_noise(shape, generator, device) -> torch.Tensor:
    """N(0, I) float32 of ``shape`` with diffusers' generator conventions (a list: one
    generator per image, each drawing its own image's values)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32)


def timestep_table(stage: StagePlan, device) -> Callable[[float], torch.Tensor]:
    """``sigma -> 1000 * sigma`` as a 0-d float32 tensor on ``device`` for a stage's sigmas.

    The values are moved to the device in one copy per stage: a ``torch.tensor(..., device=)``
    per step would be a host-to-device copy, and a device synchronisation, every step.  A sigma
    that is not one of the stage's is converted on demand.
    """
    values = torch.tensor(stage.sigmas * 1000.0, dtype=torch.float32, device=device)
    table = dict(zip((float(sigma) for sigma in stage.sigmas), values.unbind(0)))

    def lookup(sigma: float) -> torch.Tensor:
        value = table.get(sigma)
        return value if value is not None else torch.tensor(sigma * 1000.0, dtype=torch.float32, device=device)

    return lookup


def next_layout(plan: Plan, stage: StagePlan, batch: int, selected: torch.Tensor | None, device) -> TokenLayout:
    """The token layout a stage runs on (``selected``: the mixed stage's upsampled tokens)."""
    if stage.role == "low":
        return TokenLayout.low(batch, plan.grid, device)
    if stage.role == "full":
        return TokenLayout.full(batch, plan.grid, device)
    return TokenLayout.from_selection(selected, plan.grid, "mixed")


def run_stages(
    plan: Plan,
    canvas: torch.Tensor,
    model: StageModel,
    *,
    generator=None,
    compat: PaperCompat = PaperCompat(),
    canny_thresholds: tuple[float, float] = CANNY_THRESHOLDS,
    step_end: Callable[[StepInfo, torch.Tensor, TokenLayout], torch.Tensor] | None = None,
    progress=None,
    should_stop: Callable[[], bool] | None = None,
) -> Result:
    """Run every stage of ``plan`` from the first stage's ``canvas`` ``(B, C, H, W)``.

    ``step_end(info, patches, layout)`` may return replaced patches; ``progress`` is a
    tqdm-like bar (``update``, ``set_postfix_str``); ``should_stop()`` True ends the loop
    early (the result is the current canvas, ``interrupted=True``).
    """
    canvas = canvas.float()
    batch, device = canvas.shape[0], canvas.device
    with section("gather_scatter"):
        layout = next_layout(plan, plan.stages[0], batch, None, device)
        patches = layout.gather(canvas)
    selected = None
    step = 0
    for stage in plan.stages:
        if stage.index > 0:
            # ``canvas`` is the previous stage's result, scattered when that stage ended.
            with section("gather_scatter"):
                new_layout = next_layout(plan, stage, batch, selected, device)
            with section("noise"):
                eps = draw_noise(canvas.shape, generator, device)
                canvas = renoise(canvas, layout.full_mask, new_layout.full_mask, plan.transitions[stage.index - 1], eps, plan.c, compat)
            with section("gather_scatter"):
                layout = new_layout
                patches = layout.gather(canvas)
        if patches.shape[1] != stage.tokens:
            raise RuntimeError(f"stage {stage.index + 1} carries {patches.shape[1]} tokens, expected {stage.tokens}")
        velocity = None
        with model.stage(layout, stage) as velocity_fn:
            for i in range(stage.steps):
                if should_stop is not None and should_stop():
                    return Result(layout.scatter(patches), layout, selected, True)
                sigma, sigma_next = float(stage.sigmas[i]), float(stage.sigmas[i + 1])
                with section("transformer"):
                    velocity = velocity_fn(patches, sigma).float()
                patches = patches + velocity * (sigma_next - sigma)
                info = StepInfo(stage.index, i, step, sigma, sigma_next, stage.role, len(plan.stages), stage.steps, plan.total_steps)
                if step_end is not None:
                    patches = step_end(info, patches, layout).float()
                if progress is not None:
                    progress.set_postfix_str(f"stage {stage.index + 1}/{len(plan.stages)} ({stage.role}) step {i + 1}/{stage.steps}", refresh=False)
                    progress.update()
                step += 1
        following = plan.stages[stage.index + 1] if stage.index + 1 < len(plan.stages) else None
        if following is not None and following.role == "mixed":
            selected = select_tokens(plan, layout, patches, velocity, float(stage.sigmas[-1]), model, compat, canny_thresholds)
        with section("gather_scatter"):
            canvas = layout.scatter(patches)
    return Result(canvas, layout, selected, False)


def select_tokens(
    plan: Plan,
    layout: TokenLayout,
    patches: torch.Tensor,
    velocity: torch.Tensor,
    sigma_end: float,
    model: StageModel,
    compat: PaperCompat,
    thresholds: tuple[float, float],
) -> torch.Tensor:
    """Top-k edge tokens ``(B, k)`` per image from the Tweedie estimate at the end of the
    low-res stage (``velocity``: that of its last step)."""
    batch = patches.shape[0]
    if plan.k == 0:
        return torch.zeros(batch, 0, dtype=torch.long, device=patches.device)
    with section("edge_decode"):
        x0 = layout.scatter(tweedie(patches, velocity, sigma_end))[:, :, ::2, ::2]
        images = model.decode_for_edges(x0)
    with section("edge_select"):
        return select_edge_tokens(images, plan.grid, plan.k, clip_only=compat.clip_decode, thresholds=thresholds).to(patches.device)
