"""Images of every v2 row from the same labels and per-image noise, with what they cost,
kept in a work folder so that an interrupted run continues and a new row does not
regenerate the others.

Pipelines (baseline, fewer steps, RALU through ``from_pipe``) run through
:func:`ralu_lab.testbed.v2.evaluate.generate`; FLUX's staged peers through the staged
Euler sampler (:class:`ralu_lab.bench.quality.sampler.StagedSampler`) on the testbed's
latents, conditioning and decoder.  A batch is stored under a key of everything that determines it:
the row's definition (schedule content, steps, stages, positions, cache settings), the
labels' seed and count, the guidance, and the hashes of the weight files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

from ralu.calibrate.fewer_steps import plain_schedule
from ralu.calibrate.magcache import measure_mag_ratios
from ralu.runtime import RALUFluxPipeline, RALUStableDiffusion3Pipeline
from ralu.runtime.cache import disable_cache, enable_cache, mag_cache_config
from ralu.runtime.noise import clear_global_noise
from ralu_lab.bench.quality.sampler import StagedSampler
from ralu_lab.bench.quality.v2.cost import CostLog, DecoderCost, RunCost
from ralu_lab.bench.quality.v2.plan import MAG_SEED_OFFSET, ArchMethod
from ralu_lab.testbed.v2 import data
from ralu_lab.testbed.v2 import model as tb
from ralu_lab.testbed.v2.conditioning import encode_labels, null_embeds
from ralu_lab.testbed.v2.evaluate import generate, image_generators

#: Bump when the way images are made changes (old work files are then not reused).
WORK_VERSION = 1

#: Each cache kind: its diffusers settings (a function of the MagCache ratios) and how the report describes them.
CACHE_SETTINGS = {
    "first_block": (lambda ratios: FirstBlockCacheConfig(threshold=0.2), "diffusers FirstBlockCacheConfig(threshold=0.2)"),
    "taylorseer": (lambda ratios: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1), "TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1)"),
    "magcache": (lambda ratios: mag_cache_config(ratios, threshold=0.06, retention_ratio=0.2),
                 "MagCache threshold 0.06, retention 0.2, per-stage ratios measured on other seeds and labels"),
}


def file_hashes(folders: dict[str, Path]) -> dict[str, str]:
    """SHA-256 of every weight and config file of each part (what the images depend on)."""
    out = {}
    for part, folder in folders.items():
        digest = hashlib.sha256()
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and path.suffix in (".safetensors", ".json", ".bin") and path.name not in ("training.json", "checkpoint.pt"):
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
        out[part] = digest.hexdigest()[:16]
    return out


def method_identity(method: ArchMethod) -> dict:
    """Everything of a row that determines its images."""
    return {
        "arch": method.arch, "kind": method.kind, "steps": method.steps,
        "schedule": None if method.schedule is None else method.schedule.model_dump(mode="json", exclude={"calibration"}),
        "paper_compat": method.paper_compat, "positions": method.positions, "cache": method.cache and CACHE_SETTINGS[method.cache][1],
        "stages": [[role, [float(s) for s in sigmas]] for role, sigmas in method.stages], "transition": method.transition,
    }


class WorkStore:
    """Generated batches on disk, one file per key (written atomically)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.folder / f"{key['arch']}-{key['seed']}-{digest}.pt"

    def load(self, key: dict):
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=False)
        except Exception:  # a damaged file is regenerated
            return None

    def save(self, key: dict, value) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(value, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class V2Sampler(StagedSampler):
    """One architecture's images and costs (:meth:`run`), reusing the work folder's batches."""

    def __init__(self, arch: str, pipe, batch_size: int, store: WorkStore, weights: dict[str, str], transformer_cost):
        self.arch, self.pipe, self.batch_size, self.store, self.weights = arch, pipe, batch_size, store, weights
        self.size = tb.LATENT_SIZE  # the staged sampler's noise is a full-size latent
        self.guidance_scale = tb.GUIDANCE_SCALE[arch]  # what call_inputs gives the pipelines
        self.ralu = (RALUFluxPipeline if arch == "flux" else RALUStableDiffusion3Pipeline).from_pipe(pipe)
        self.ralu.set_progress_bar_config(disable=True)
        self.transformer_cost = transformer_cost
        self.decoder_cost = DecoderCost(pipe.vae.config)
        self._mag_ratios: dict[str, list] = {}

    # the staged sampler's noise, conditioning and decoder
    def _generators(self, n: int, seed: int):
        return image_generators(n, seed)

    def _condition(self, labels):
        return encode_labels(labels, dtype=self.transformer.dtype)

    def _to_images(self, latent):
        return tb.latents_to_images(self.pipe.vae, latent)

    def _velocity(self, x, sigma: float, cond: dict, guidance):
        """The staged peers guide as the pipeline does: ``FluxPipeline``'s true-CFG formula with
        the empty prompt as the negative (:data:`ralu_lab.testbed.v2.model.TRUE_CFG_SCALE`)."""
        v = super()._velocity(x, sigma, cond, guidance)
        scale = tb.TRUE_CFG_SCALE.get(self.arch)
        if scale is None:
            return v
        v_neg = super()._velocity(x, sigma, null_embeds(x.shape[0], dtype=self.transformer.dtype), guidance)
        return v_neg + scale * (v - v_neg)

    def run(self, method: ArchMethod, labels, seed: int) -> tuple[torch.Tensor, RunCost, bool]:
        """Images ``(n, 3, 64, 64)`` in [-1, 1] and their per-image cost; True when they came from the work folder."""
        key = {"version": WORK_VERSION, "arch": self.arch, "seed": int(seed), "images": int(labels.shape[0]), "labels": labels.tolist(),
               "guidance": [self.guidance_scale, tb.TRUE_CFG_SCALE.get(self.arch)], "weights": self.weights, "method": method_identity(method)}
        if method.cache == "magcache":
            key["mag_ratios"] = self.mag_ratios(method)
        stored = self.store.load(key)
        if stored is not None:
            return stored["images"], RunCost(**stored["cost"]), True
        log = CostLog(self.transformer, self.pipe.vae)
        cache = None
        if method.cache is not None:
            cache = CACHE_SETTINGS[method.cache][0](self.mag_ratios(method) if method.cache == "magcache" else None)
            enable_cache(self.transformer, cache)
        try:
            with log.record():
                images = self._generate(method, labels, seed)
        finally:
            if cache is not None:
                disable_cache(self.transformer)
        cost = log.cost(labels.shape[0], self.transformer_cost, self.decoder_cost, cached=method.cache is not None)
        self.store.save(key, {"images": images, "cost": asdict(cost)})
        return images, cost, False

    def _generate(self, method: ArchMethod, labels, seed: int) -> torch.Tensor:
        common = dict(batch_size=self.batch_size)  # call_inputs sets the arch's guidance
        if method.kind == "pipeline":
            return generate(self.pipe, self.arch, labels, seed, method.steps, **common)
        if method.kind == "ralu":
            extra = {"low_res_positions": method.positions} if method.positions else {}
            if method.paper_compat:
                # the published script's correlated draw comes from the global RNG once per
                # process; seeding it per (row, seed) keeps every run reproducible
                clear_global_noise()
                torch.manual_seed(seed)
            return generate(self.ralu, self.arch, labels, seed, None, schedule=method.schedule, paper_compat=method.paper_compat, **extra, **common)
        if method.kind == "staged":
            return self.staged(method, labels, seed)
        raise ValueError(f"unknown method kind {method.kind!r}")

    def mag_ratios(self, method: ArchMethod) -> list[list[float]]:
        """MagCache's per-stage ratios of a row, measured on other labels and noise than any
        sample.  A plain row's table is measured on the one-stage schedule of its step count,
        which is FluxPipeline's own grid (docs/diffusers.md §4), so it fits the plain call."""
        name = f"{method.uncached}@{method.budget}"
        if name not in self._mag_ratios:
            labels = data.balanced_labels(4, MAG_SEED_OFFSET)
            call = {**tb.call_inputs(self.arch, labels), "generator": image_generators(4, MAG_SEED_OFFSET)}
            if method.positions:
                call["low_res_positions"] = method.positions
            schedule = method.schedule
            if schedule is None:
                model = "flux-dev" if self.arch == "flux" else "sd3-medium"
                schedule = plain_schedule(model, method.steps, data.IMAGE_SIZE, data.IMAGE_SIZE, tb.base_shift(self.arch), tb.BASE_STEPS[self.arch])
            ratios = measure_mag_ratios(self.ralu, schedule, [call])
            self._mag_ratios[name] = [[round(float(r), 6) for r in stage] for stage in ratios]
        return self._mag_ratios[name]
