"""The benchmark's configurations: which models are built at which sizes, on what device."""

from __future__ import annotations

from dataclasses import dataclass

from ralu.calibrate.bench.speed.args import COMPILE_BACKENDS, QUICK_COMPILE_BACKEND
from ralu.calibrate.presets import PAPER_SIZE
from ralu.runtime import shipped_schedules
from ralu.runtime.models import ModelSpec, get_model

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


#: The families the benchmark builds (its reduced-width and full-width models).
BENCHED_FAMILIES = ("flux", "sd3")


def benchable_schedules() -> list[str]:
    """The shipped schedules of the families the benchmark builds."""
    from ralu.runtime import load_schedule

    return [name for name in shipped_schedules() if load_schedule(name).family in BENCHED_FAMILIES]


@dataclass(frozen=True)
class FamilyConfig:
    """One model family as benchmarked: the transformer built, and its text conditioning."""

    family: str  # "flux" or "sd3"
    model: str  # the real model the shipped schedules are for (FLOPs of the real architecture)
    transformer: dict
    text_tokens: int
    text_dim: int
    pooled_dim: int
    guidance_scale: float

    @property
    def spec(self) -> ModelSpec:
        return get_model(self.model)

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance doubles every transformer batch (SD3)."""
        return self.spec.cfg

    def image_tokens(self, size: int) -> int:
        """Image tokens of one full-resolution forward at ``size x size``."""
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


def reduced_families(quick: bool) -> tuple[FamilyConfig, FamilyConfig]:
    """The real block patterns (FLUX 19 dual + 38 single blocks, SD3-medium 24 joint blocks)
    at one 32-wide attention head; ``quick``: 1 + 2 FLUX blocks, 2 SD3 blocks, short text."""
    flux_spec, sd3_spec = get_model("flux-dev"), get_model("sd3-medium")
    flux = dict(
        # FLUX packs 2x2 latent pixels into one token.
        patch_size=1, in_channels=4 * flux_spec.latent_channels, num_layers=1 if quick else 19, num_single_layers=2 if quick else 38,
        attention_head_dim=32, num_attention_heads=1, joint_attention_dim=64, pooled_projection_dim=64,
        guidance_embeds=True, axes_dims_rope=(8, 12, 12),
    )
    sd3 = dict(
        sample_size=128, patch_size=2, in_channels=sd3_spec.latent_channels, num_layers=2 if quick else 24,
        attention_head_dim=32, num_attention_heads=1, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, out_channels=sd3_spec.latent_channels, pos_embed_max_size=192,
    )
    return (
        FamilyConfig("flux", "flux-dev", flux, text_tokens=32 if quick else flux_spec.text_tokens, text_dim=64, pooled_dim=64, guidance_scale=3.5),
        FamilyConfig("sd3", "sd3-medium", sd3, text_tokens=24 if quick else sd3_spec.text_tokens, text_dim=64, pooled_dim=64, guidance_scale=7.0),
    )


def full_width_families() -> tuple[FamilyConfig, FamilyConfig]:
    """FLUX.1-dev and SD3-medium at their real sizes (random weights)."""
    return (_real_family("flux", "flux-dev", guidance_scale=3.5), _real_family("sd3", "sd3-medium", guidance_scale=7.0))


def _real_family(family: str, model: str, guidance_scale: float) -> FamilyConfig:
    """``model`` as the registry declares it: its transformer, text length and embedding widths."""
    spec = get_model(model)
    transformer = dict(spec.architecture.transformer)
    return FamilyConfig(
        family, model, transformer, text_tokens=spec.text_tokens, text_dim=transformer["joint_attention_dim"],
        pooled_dim=transformer["pooled_projection_dim"], guidance_scale=guidance_scale,
    )


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
      width (one 32-wide head), a real-shaped VAE at 1/16 of the real channel widths,
      float32, 3 repeats;
    * ``quick``: 256x256 (schedules re-targeted to that size), 1 + 2 FLUX blocks, 2 SD3
      blocks, short text, a tiny VAE, 1 repeat: the same code path in seconds (CI);
    * ``device="cuda"``: bfloat16, 5 repeats and by default ``widths="full"``: FLUX.1-dev and
      SD3-medium at their real sizes with random weights (reduced widths on a GPU measure
      kernel-launch latency, not the method);
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
        families, vae, size, preset = reduced_families(True), _vae((8, 8, 8, 8), 1, 4), 256, "quick"
    elif widths == "full":
        families, vae, size, preset = full_width_families(), vae_shape("flux-dev"), PAPER_SIZE, "full-width"
    else:
        families, vae, size, preset = reduced_families(False), _vae((8, 16, 32, 32), 2, 8), PAPER_SIZE, "reduced-width"
    if quick and compile_backend is None:
        compile_backend = QUICK_COMPILE_BACKEND
    if compile_backend is not None and compile_backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend {compile_backend!r}: use one of {list(COMPILE_BACKENDS)}")
    return BenchConfig(preset, device, dtype, widths, size, repeats, threads, chosen, families, vae, caches=caches, compile_backend=compile_backend)
