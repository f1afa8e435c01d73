"""``ralu.runtime.profiling``: sections are free without a profiler, exclusive when nested, and
profiling leaves the sampled latents unchanged."""

from __future__ import annotations

import pytest


def test_sections_are_shared_no_ops_without_a_profiler():
    from ralu.runtime.profiling import active, section

    assert active() is None
    assert section("noise") is section("positions")
    with section("noise"):
        pass


def test_nested_sections_are_exclusive():
    from ralu.runtime.profiling import Profiler, section

    ticks = iter(range(100))
    with Profiler(clock=lambda: float(next(ticks))) as profiler:
        with section("edge_decode"):  # opens at 0
            with section("gather_scatter"):  # 1 .. 2
                pass
            pass  # edge_decode closes at 3
        with section("noise"):  # 4 .. 5
            pass
    assert profiler.seconds == {"edge_decode": 2.0, "gather_scatter": 1.0, "noise": 1.0}
    assert profiler.calls == {"edge_decode": 1, "gather_scatter": 1, "noise": 1}
    assert profiler.total(("edge_decode", "noise")) == 3.0
    with pytest.raises(RuntimeError):
        with Profiler():
            with Profiler():
                pass


def test_profiling_does_not_change_results(flux_pipe, flux_embeds, make_schedule):
    import torch

    from ralu.runtime import RALUFluxPipeline
    from ralu.runtime.profiling import OVERHEAD_SECTIONS, Profiler

    pipe = RALUFluxPipeline.from_pipe(flux_pipe)
    pipe.set_progress_bar_config(disable=True)
    schedule = make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (2, 1.0, 2.2)], height=128, width=128)

    def run():
        return pipe(**flux_embeds(2), schedule=schedule, generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="latent").images

    plain = run()
    with Profiler() as profiler:
        profiled = run()
    assert torch.equal(plain, profiled)
    assert set(OVERHEAD_SECTIONS) <= set(profiler.seconds)
    assert profiler.calls["transformer"] == 6
