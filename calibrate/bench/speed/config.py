"""The benchmark's configurations: which models are built at which sizes, on what device."""

from __future__ import annotations

from dataclasses import dataclass

from ralu.calibrate.flops import FLUX_DEV_TRANSFORMER, SD3_MEDIUM_TRANSFORMER, VAE_16CH
from ralu.runtime import shipped_schedules

FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
#: VAE latent scaling and shift of FLUX.1 and SD3 (they cost nothing, but keep the decode honest).
VAE_SCALING = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}


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
    def cfg(self) -> bool:
        """Classifier-free guidance doubles every transformer batch (SD3)."""
        return self.family == "sd3"

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

    def family(self, name: str) -> FamilyConfig:
        return next(f for f in self.families if f.family == name)


def _vae(block_out_channels, layers_per_block, groups) -> dict:
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, latent_channels=16, norm_num_groups=groups,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def reduced_families(quick: bool) -> tuple[FamilyConfig, FamilyConfig]:
    """The real block patterns (FLUX 19 dual + 38 single blocks, SD3-medium 24 joint blocks)
    at one 32-wide attention head; ``quick``: 1 + 2 FLUX blocks, 2 SD3 blocks, short text."""
    flux = dict(
        patch_size=1, in_channels=64, num_layers=1 if quick else 19, num_single_layers=2 if quick else 38,
        attention_head_dim=32, num_attention_heads=1, joint_attention_dim=64, pooled_projection_dim=64,
        guidance_embeds=True, axes_dims_rope=(8, 12, 12),
    )
    sd3 = dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=2 if quick else 24, attention_head_dim=32,
        num_attention_heads=1, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        out_channels=16, pos_embed_max_size=192,
    )
    return (
        FamilyConfig("flux", "flux-dev", flux, text_tokens=32 if quick else 512, text_dim=64, pooled_dim=64, guidance_scale=3.5),
        FamilyConfig("sd3", "sd3-medium", sd3, text_tokens=24 if quick else 333, text_dim=64, pooled_dim=64, guidance_scale=7.0),
    )


def full_width_families() -> tuple[FamilyConfig, FamilyConfig]:
    """FLUX.1-dev and SD3-medium at their real sizes (random weights)."""
    return (
        FamilyConfig("flux", "flux-dev", dict(FLUX_DEV_TRANSFORMER), text_tokens=512, text_dim=4096, pooled_dim=768, guidance_scale=3.5),
        FamilyConfig("sd3", "sd3-medium", dict(SD3_MEDIUM_TRANSFORMER), text_tokens=333, text_dim=4096, pooled_dim=2048, guidance_scale=7.0),
    )


def make_config(
    device: str = "cpu",
    quick: bool = False,
    widths: str | None = None,
    dtype: str | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    schedules: tuple[str, ...] | None = None,
) -> BenchConfig:
    """The benchmark configuration.

    * default (CPU): 1024x1024, the real token counts, the real block patterns at reduced
      width (one 32-wide head), a real-shaped VAE at 1/16 of the real channel widths,
      float32, 3 repeats;
    * ``quick``: 256x256 (schedules re-targeted to that size), 1 + 2 FLUX blocks, 2 SD3
      blocks, short text, a tiny VAE, 1 repeat: the same code path in seconds (CI);
    * ``device="cuda"``: bfloat16, 5 repeats and by default ``widths="full"``: FLUX.1-dev and
      SD3-medium at their real sizes with random weights (reduced widths on a GPU measure
      kernel-launch latency, not the method).
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
    available = shipped_schedules()
    chosen = tuple(schedules) if schedules else tuple(available)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(f"unknown schedule(s) {unknown}. Fix: use shipped schedules {available}")
    if quick:
        families, vae, size, preset = reduced_families(True), _vae((8, 8, 8, 8), 1, 4), 256, "quick"
    elif widths == "full":
        families, vae, size, preset = full_width_families(), dict(VAE_16CH), 1024, "full-width"
    else:
        families, vae, size, preset = reduced_families(False), _vae((8, 16, 32, 32), 2, 8), 1024, "reduced-width"
    return BenchConfig(preset, device, dtype, widths, size, repeats, threads, chosen, families, vae)
