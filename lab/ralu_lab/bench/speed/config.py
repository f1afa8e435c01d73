"""The benchmark's configurations: which models are built at which sizes, on what device."""

from __future__ import annotations

from dataclasses import dataclass, field

from ralu.calibrate.presets import PAPER_SIZE
from ralu.runtime import load_schedule, shipped_schedules
from ralu.runtime.models import ModelSpec, get_model
from ralu_lab.bench.speed.args import COMPILE_BACKENDS, QUICK_COMPILE_BACKEND
from ralu_lab.bench.speed.families import ADAPTERS, QUICK_TEXT_TOKENS, REDUCED_TEXT_DIM, BenchFamily, adapter

#: The VAE config keys that set the latent scaling, which differs between FLUX.1 and SD3 while
#: the VAE's shape does not: :func:`vae_shape` leaves them out, ``build_vae`` sets them per model.
LATENT_SCALING_KEYS = ("scaling_factor", "shift_factor")


def vae_shape(model: str) -> dict:
    """The registry's VAE config of ``model`` without its latent scaling."""
    return {k: v for k, v in get_model(model).architecture.vae.items() if k not in LATENT_SCALING_KEYS}


def latent_scaling(model: str) -> dict:
    """``scaling_factor`` and ``shift_factor`` of the model's VAE (they cost nothing, but keep
    the decode honest)."""
    vae = get_model(model).architecture.vae
    return {k: vae[k] for k in LATENT_SCALING_KEYS}


#: The families the benchmark builds (its reduced-width and full-width models): every family
#: with an adapter (.families), which is every family with shipped schedules.
BENCHED_FAMILIES = tuple(ADAPTERS)


def benchable_schedules() -> list[str]:
    """The shipped schedules of the families the benchmark builds."""
    return [name for name in shipped_schedules() if load_schedule(name).family in BENCHED_FAMILIES]


@dataclass(frozen=True)
class FamilyConfig:
    """One model family as benchmarked: the transformer built, its text conditioning, guidance
    and VAE (the adapter in .families says how each is built and called)."""

    family: str  # a key of .families.ADAPTERS
    model: str  # the real model the shipped schedules are for (FLOPs of the real architecture)
    transformer: dict
    text_tokens: int
    text_dim: int
    pooled_dim: int  # 0: no pooled vector
    guidance_scale: float | None  # None: not passed
    true_cfg_scale: float | None = None
    #: Image tokens of a conditioning image in every forward of both pipelines (Kontext's reference).
    reference_tokens: int = 0
    transformer_class: str = ""
    vae_class: str = "AutoencoderKL"
    vae: dict = field(default_factory=dict)  # the VAE's constructor arguments, latent scaling included
    base_pipeline: str = ""
    ralu_pipeline: str = ""
    #: Whether the base pipeline opens cache contexts (plain-pipeline cache rows).
    plain_caches: bool = False

    @property
    def adapter(self) -> BenchFamily:
        return adapter(self.family)

    @property
    def spec(self) -> ModelSpec:
        return get_model(self.model)

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance doubles every transformer evaluation (SD3: one doubled
        batch; the true-CFG families: a second forward per step)."""
        return self.spec.cfg

    def image_tokens(self, size: int) -> int:
        """Image tokens of one full-resolution forward at ``size x size`` (generated image only)."""
        return self.spec.image_tokens(size, size)

    def half_latent_side(self, size: int) -> int:
        """Side of the half-size latent the edge detection decodes."""
        return size // (2 * self.spec.vae_scale_factor)

    @property
    def transformer_batch(self) -> int:
        return 2 if self.cfg else 1


@dataclass(frozen=True)
class BenchConfig:
    preset: str
    device: str
    dtype: str
    widths: str
    size: int
    repeats: int
    threads: int | None
    schedules: tuple[str, ...]
    families: tuple[FamilyConfig, ...]
    vae: dict
    output_type: str = "latent"
    seed: int = 0
    caches: bool = True  # the step-cache rows (.caches)
    compile_backend: str | None = None  # the compiled rows' torch.compile backend (.compiled); None: no such rows

    def family(self, name: str) -> FamilyConfig:
        return next(f for f in self.families if f.family == name)


def _vae(block_out_channels, layers_per_block, groups) -> dict:
    """The real VAE's shape (FLUX.1's and SD3's are the same) at other widths."""
    return dict(
        vae_shape("flux-dev"), block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        norm_num_groups=groups,
    )


def family_vae(bench: BenchFamily, widths: dict | None) -> dict:
    """The constructor arguments of ``bench``'s VAE: the registry's real one (``widths`` None),
    or its layout at the block widths, layers and groups of ``widths`` (an AutoencoderKL shape,
    :func:`_vae`): FLUX.2's AutoencoderKLFlux2 (32 channels, quant convs, BatchNorm) takes them
    as they are, Qwen-Image's 3-D AutoencoderKLQwenImage as ``base_dim`` x ``dim_mult``."""
    real = dict(bench.spec.architecture.vae)
    if widths is None:
        return real
    if bench.vae_class == "AutoencoderKL":
        return {**widths, **latent_scaling(bench.model)}
    blocks, layers = list(widths["block_out_channels"]), widths["layers_per_block"]
    if bench.vae_class == "AutoencoderKLFlux2":
        return dict(real, block_out_channels=tuple(blocks), layers_per_block=layers, norm_num_groups=widths["norm_num_groups"])
    if bench.vae_class == "AutoencoderKLQwenImage":
        return dict(real, base_dim=blocks[0], dim_mult=[width // blocks[0] for width in blocks], num_res_blocks=layers)
    raise ValueError(f"{bench.family}: no reduced-width rule for {bench.vae_class}. Fix: add one to ralu_lab.bench.speed.config.family_vae")


def _family_config(bench: BenchFamily, transformer: dict, text_tokens: int, text_dim: int, pooled_dim: int, vae: dict, size: int) -> FamilyConfig:
    return FamilyConfig(
        bench.family, bench.model, transformer, text_tokens=text_tokens, text_dim=text_dim, pooled_dim=pooled_dim,
        guidance_scale=bench.guidance_scale, true_cfg_scale=bench.true_cfg_scale,
        reference_tokens=bench.spec.image_tokens(size, size) if bench.reference else 0,
        transformer_class=bench.transformer_class, vae_class=bench.vae_class, vae=vae, base_pipeline=bench.base_pipeline,
        ralu_pipeline=bench.ralu_pipeline, plain_caches=bench.plain_caches,
    )


def reduced_families(quick: bool, widths: dict | None = None, size: int = PAPER_SIZE) -> tuple[FamilyConfig, ...]:
    """Every family's real block pattern (FLUX 19 dual + 38 single blocks, SD3-medium 24 joint
    blocks, ...) at one 32-wide attention head and 64-wide text; ``quick``: one to three
    blocks, short text.  ``widths``: the AutoencoderKL shape the VAEs are narrowed to."""
    widths = widths or (_vae((8, 8, 8, 8), 1, 4) if quick else _vae((8, 16, 32, 32), 2, 8))
    out = []
    for bench in ADAPTERS.values():
        spec = bench.spec
        # SD3's quick text was 24 tokens before the other families came: kept.
        tokens = (24 if bench.family == "sd3" else QUICK_TEXT_TOKENS) if quick else spec.text_tokens
        out.append(_family_config(bench, bench.reduced(dict(spec.architecture.transformer), quick), tokens, REDUCED_TEXT_DIM,
                                  REDUCED_TEXT_DIM if bench.pooled else 0, family_vae(bench, widths), size))
    return tuple(out)


def full_width_families(size: int = PAPER_SIZE) -> tuple[FamilyConfig, ...]:
    """Every benchmarked model at its real size (random weights), as the registry declares it."""
    return tuple(_real_family(bench, size) for bench in ADAPTERS.values())


def _real_family(bench: BenchFamily, size: int = PAPER_SIZE) -> FamilyConfig:
    """``bench``'s model as the registry declares it: its transformer, text length and embedding widths."""
    spec = get_model(bench.model)
    transformer = dict(spec.architecture.transformer)
    return _family_config(bench, transformer, spec.text_tokens, transformer["joint_attention_dim"],
                          transformer.get("pooled_projection_dim", 0) if bench.pooled else 0, family_vae(bench, None), size)


def make_config(
    device: str = "cpu",
    quick: bool = False,
    widths: str | None = None,
    dtype: str | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    schedules: tuple[str, ...] | None = None,
    caches: bool = True,
    compile_backend: str | None = None,
) -> BenchConfig:
    """The benchmark configuration.

    * default (CPU): 1024x1024, the real token counts, the real block patterns at reduced
      width (one 32-wide head), real-shaped VAEs at 1/16 of the real channel widths,
      float32, 3 repeats;
    * ``quick``: 256x256 (schedules re-targeted to that size), one to three blocks per
      family, short text, tiny VAEs, 1 repeat: the same code path in seconds (CI);
    * ``device="cuda"``: bfloat16, 5 repeats and by default ``widths="full"``: every
      benchmarked model at its real size (the registry's configs) with random weights
      (reduced widths on a GPU measure kernel-launch latency, not the method); each family's
      models are freed before the next is built;

    Only the families of the chosen ``schedules`` are built.
    * ``caches``: rows with step caches; ``compile_backend``: rows with a compiled transformer
      (``quick`` adds them always, with ``aot_eager`` unless a backend is given).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: use 'cpu' or 'cuda'")
    widths = widths or ("full" if device == "cuda" and not quick else "reduced")
    if widths not in ("reduced", "full"):
        raise ValueError(f"widths={widths!r}: use 'reduced' or 'full'")
    if widths == "full" and (device != "cuda" or quick):
        raise ValueError("--widths full needs --device cuda and no --quick (real-size models take hours per image on a CPU)")
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r}: use float32, bfloat16 or float16")
    if repeats is None:
        repeats = 1 if quick else 5 if device == "cuda" else 3
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    available = benchable_schedules()
    chosen = tuple(schedules) if schedules else tuple(available)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(f"unknown schedule(s) {unknown}. Fix: use shipped schedules of the benchmarked families {available}")
    if quick:
        vae, size, preset = _vae((8, 8, 8, 8), 1, 4), 256, "quick"
        families = reduced_families(True, vae, size)
    elif widths == "full":
        families, vae, size, preset = full_width_families(), vae_shape("flux-dev"), PAPER_SIZE, "full-width"
    else:
        vae, size, preset = _vae((8, 16, 32, 32), 2, 8), PAPER_SIZE, "reduced-width"
        families = reduced_families(False, vae, size)
    # Only the families of the chosen schedules are built.
    chosen_families = {load_schedule(name).family for name in chosen}
    families = tuple(f for f in families if f.family in chosen_families)
    if quick and compile_backend is None:
        compile_backend = QUICK_COMPILE_BACKEND
    if compile_backend is not None and compile_backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend {compile_backend!r}: use one of {list(COMPILE_BACKENDS)}")
    return BenchConfig(preset, device, dtype, widths, size, repeats, threads, chosen, families, vae, caches=caches, compile_backend=compile_backend)
