"""MagCache's magnitude ratios for a RALU schedule, measured stage by stage.

MagCache (``diffusers.hooks.MagCacheConfig``) skips a step when the accumulated change of the
transformer's residual (last block's image output minus first block's image input) is
predicted to be small; the prediction is a table of ratios ``mean ||r_t|| / ||r_{t-1}||`` (per
token, averaged), one per step.  The table depends on the step grid, and a RALU schedule walks
its own shifted grid in every stage, restarting at each stage change (the cache is reset there),
so the 50-step table of a plain sampler does not describe it.  :func:`measure_mag_ratios` runs
a RALU pipeline and measures the table of every stage; the first step of a stage has no
previous residual and gets 1.0, as in diffusers' own calibration mode.
"""

from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["measure_mag_ratios"]

#: Added to a previous residual's norm before dividing (diffusers' calibration uses the same).
_EPS = 1e-8


def _head_and_tail(transformer):
    """The first block (whose image input starts the residual) and the last one (whose image
    output ends it): FLUX's last single-stream block, SD3's last joint block."""
    tail_blocks = getattr(transformer, "single_transformer_blocks", None) or transformer.transformer_blocks
    return transformer.transformer_blocks[0], tail_blocks[-1]


def _image_index(block) -> int:
    """Index of the image stream in ``block``'s output, as diffusers' cache hooks read it."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        return TransformerBlockRegistry.get(type(block)).return_hidden_states_index
    except ValueError:
        return 1  # (text, image), the FLUX.1 / SD3 convention


class _ResidualNorms:
    """Per-token norms ``(B, N)`` of the residual of every forward, in call order."""

    def __init__(self, transformer):
        self.norms: list[torch.Tensor] = []
        self._input = None
        head, tail = _head_and_tail(transformer)
        self._handles = [
            head.register_forward_pre_hook(self._head, with_kwargs=True),
            tail.register_forward_hook(self._tail),
        ]

    def _head(self, module, args, kwargs):
        self._input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _tail(self, module, args, output):
        # Where the block returns its image stream: diffusers' block registry, which its own
        # MagCache hook reads (FLUX.1, SD3, Qwen-Image: (text, image); FLUX.2's single block:
        # the fused text + image stream).
        image = output[_image_index(module)] if isinstance(output, (tuple, list)) else output
        if image.ndim == 3 and image.shape[1] > self._input.shape[1]:
            # The fused text + image sequence (FLUX.2's single blocks): the image tokens are at
            # the end, as diffusers' MagCache hook reads them.
            image = image[:, -self._input.shape[1]:]
        residual = image.float() - self._input.float()
        self.norms.append(torch.linalg.norm(residual, dim=-1))

    def close(self):
        for handle in self._handles:
            handle.remove()


def measure_mag_ratios(pipe, schedule, calls: list[dict]) -> list[list[float]]:
    """MagCache ratios of every stage of ``schedule`` on a RALU pipeline ``pipe``.

    ``calls``: keyword arguments of the pipeline calls to measure on (prompts or embeddings,
    generator, guidance...); each runs once with ``schedule`` and ``output_type="latent"``.
    Returns one list per stage, one ratio per step: step t's ratio is the mean over calls,
    branches (true CFG's cond and uncond), images and tokens of ``||r_t|| / ||r_{t-1}||``.
    The transformer must have no cache enabled (it would skip the blocks measured).
    """
    from ralu.runtime.cache import cache_config
    from ralu.runtime.schedule import load_schedule

    schedule = load_schedule(schedule)
    if not calls:
        raise ValueError("measure_mag_ratios needs at least one call. Fix: pass a list of pipeline keyword arguments")
    if cache_config(pipe.transformer) is not None:
        raise ValueError("the transformer has a cache enabled: it would skip the blocks whose residual is measured. Fix: disable it first")
    steps = [stage.steps for stage in schedule.stages]
    sums: dict[tuple[int, int], list[float]] = defaultdict(list)
    recorder = _ResidualNorms(pipe.transformer)
    try:
        for kwargs in calls:
            previous: list[torch.Tensor] | None = None

            def step_end(pipeline, step, timestep, callback_kwargs):
                nonlocal previous
                stage, stage_step = callback_kwargs["stage_index"], callback_kwargs["stage_step"]
                current, recorder.norms[:] = list(recorder.norms), []
                if stage_step == 0:
                    ratio = 1.0
                else:
                    ratio = sum(float((now / (before + _EPS)).mean()) for now, before in zip(current, previous)) / len(current)
                sums[stage, stage_step].append(ratio)
                previous = current
                return {}

            pipe(**kwargs, schedule=schedule, output_type="latent", callback_on_step_end=step_end)
    finally:
        recorder.close()
    return [[sum(sums[stage, step]) / len(sums[stage, step]) for step in range(count)] for stage, count in enumerate(steps)]
