"""diffusers' context parallelism (Ulysses, "anything" mode) under RALU's FLUX sampler: one
image split over 2 CPU ranks (gloo) equals the image of one process, through all three
token counts; the default sharding and per-image batches fail as docs/scale-out.md says."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ralu.runtime.schedule import save_schedule

WORKER = r"""
import sys
import torch
import torch.distributed as dist

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()

# Two CPU-only stand-ins for what a GPU node has: enable_parallelism computes
# rank % torch.accelerator.device_count() (0 without an accelerator), and gloo's all_gather
# needs equal sizes where NCCL takes the unequal slices of "anything" mode as they are.
torch.accelerator.device_count = lambda: 1
import diffusers.hooks.context_parallel as hooks
from diffusers.models._modeling_parallel import gather_size_by_comm


def padded_all_gather(tensor, dim, group):
    sizes = gather_size_by_comm(tensor.shape[dim], group)
    shape = list(tensor.shape)
    shape[dim] = max(sizes) - tensor.shape[dim]
    padded = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part.narrow(dim, 0, size) for part, size in zip(parts, sizes)], dim=dim)


hooks._all_gather_anything = padded_all_gather

from diffusers import ContextParallelConfig
from ralu.runtime import RALUFluxPipeline

model, schedule, report = sys.argv[1], sys.argv[2], open(f"{sys.argv[3]}/rank{rank}.txt", "w")
counts = []


def generate(pipe, prompts):
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(prompts))]
    return pipe(prompts, schedule=schedule, generator=generators, output_type="pt").images


def pipeline(anything=None):
    pipe = RALUFluxPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    # The image tokens this rank embeds (after the split, when there is one).
    pipe.transformer.x_embedder.register_forward_pre_hook(lambda module, args: counts.append(args[0].shape[1]))
    if anything is not None:
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2, ulysses_anything=anything))
    return pipe


def outcome(pipe, prompts):
    try:
        generate(pipe, prompts)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "ran"


alone = generate(pipeline(), ["a cat"])
full_counts = sorted(set(counts))
counts.clear()
split = generate(pipeline(anything=True), ["a cat"])
print(f"full_counts={full_counts} split_counts={sorted(set(counts))} max_diff={(split - alone).abs().max().item():.3g}", file=report)
print(f"equipartition: {outcome(pipeline(anything=False), ['a cat'])[:200]}", file=report)
print(f"batch: {outcome(pipeline(anything=True), ['a cat', 'a red dog'])[:200]}", file=report)
report.close()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_one_image_split_over_two_ranks(tmp_path, saved_flux_pipeline, make_schedule):
    # 64x64: 16 tokens at full resolution, 4 at low resolution, 4 + 3 * 1 = 7 in the mixed stage.
    schedule = save_schedule(make_schedule([(2, 0.3, 3.0), (2, 0.45, 2.5), (2, 1.0, 2.2)], up_ratio=0.3), tmp_path / "tiny.json")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), str(saved_flux_pipeline), str(schedule), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        split, equipartition, batch = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        # The transformer saw every RALU token count; each rank embedded its share of each.
        assert split.startswith("full_counts=[4, 7, 16] " + ("split_counts=[2, 3, 8]" if rank else "split_counts=[2, 4, 8]"))
        assert float(split.split("max_diff=")[1]) < 1e-4
        assert equipartition.startswith("equipartition: AssertionError") and "divisible by mesh size" in equipartition
        assert batch.startswith("batch: RuntimeError: pos_embed called with")
