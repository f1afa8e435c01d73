"""The registry of models ralu knows: one typed record per model, and the rules that follow
from it (base shift, resolution, token counts).

Every fact about a model is declared here once and read from here by the runtime (schedule
validation, stage plans), the calibrator (base shift h0, baselines) and the FLOPs cost model
(the architecture configs it counts on the meta device).

Standard library only: the runtime imports this module, and it must stay light.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

#: A pipeline family's name: a key of :data:`FAMILIES`.
Family = str


# ----------------------------------------------------------------------------------------
# The base model's scheduler.
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DynamicShift:
    """FLUX.1's resolution-dependent time shift (``use_dynamic_shifting`` in diffusers'
    ``FlowMatchEulerDiscreteScheduler``).

    ``mu`` is linear in the image token count: ``base_shift`` at ``base_image_seq_len``
    tokens, ``max_shift`` at ``max_image_seq_len`` (and extrapolated beyond).  The scheduler's
    exponential time shift with ``mu`` equals the static shift ``exp(mu)``.
    """

    base_shift: float
    max_shift: float
    base_image_seq_len: int
    max_image_seq_len: int

    def mu(self, image_tokens: int) -> float:
        """``mu`` at ``image_tokens`` (what diffusers' ``calculate_shift`` returns)."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return self.base_shift + slope * (image_tokens - self.base_image_seq_len)


@dataclass(frozen=True)
class EmpiricalShift:
    """FLUX.2's resolution- and step-dependent time shift: diffusers' ``compute_empirical_mu``
    (``pipeline_flux2.py``, taken from Black Forest Labs' ``flux2/sampling.py``), which
    ``Flux2Pipeline`` and ``Flux2KleinPipeline`` pass to the scheduler as ``mu``.

    ``mu`` is linear in the image token count along two fitted lines, one for 10 steps and one
    for 200 steps, interpolated linearly in the step count; above ``large_image`` tokens the
    200-step line alone applies.  The scheduler's exponential time shift with ``mu`` equals the
    static shift ``exp(mu)``.
    """

    slope_10: float = 8.73809524e-05
    intercept_10: float = 1.89833333
    slope_200: float = 0.00016927
    intercept_200: float = 0.45666666
    large_image: int = 4300

    def mu(self, image_tokens: int, steps: int) -> float:
        """``mu`` at ``image_tokens`` and ``steps`` (what ``compute_empirical_mu`` returns)."""
        at_200 = self.slope_200 * image_tokens + self.intercept_200
        if image_tokens > self.large_image:
            return float(at_200)
        at_10 = self.slope_10 * image_tokens + self.intercept_10
        per_step = (at_200 - at_10) / 190.0
        intercept = at_200 - 200.0 * per_step
        return float(per_step * steps + intercept)


@dataclass(frozen=True)
class Scheduler:
    """The base model's flow-matching scheduler, as its ``scheduler_config.json`` sets it."""

    #: Static time shift.  Stored by FLUX.1-dev's config too, where dynamic shifting overrides it.
    shift: float
    #: The dynamic shift rule, or None when the static ``shift`` applies (SD3).
    dynamic: DynamicShift | None = None
    num_train_timesteps: int = 1000
    #: Qwen-Image's ``shift_terminal``: diffusers stretches the shifted grid (in progress time
    #: ``1 - sigma``, linearly) so its last nonzero sigma is this value.  A multiplicative
    #: stretch, not a shift: ``base_shift`` stays ``exp(mu)`` and the stretch is applied to a
    #: schedule's last stage at run time (``ralu.runtime.qwenimage.stretch_to_terminal``).
    shift_terminal: float | None = None
    #: A pipeline-side rule that overrides ``dynamic`` (FLUX.2 passes its own ``mu``); the
    #: scheduler config keeps ``dynamic`` so that the scheduler accepts ``mu``.
    empirical: EmpiricalShift | None = None

    def base_shift(self, image_tokens: int, steps: int | None = None) -> float:
        """h0: the shift of the base model's own sigma grid at ``image_tokens`` image tokens
        and ``steps`` steps (a rule that depends on the step count, such as FLUX.2's, reads
        ``steps``; the others ignore it)."""
        if self.empirical is not None:
            if steps is None:
                raise ValueError("this model's base shift depends on the step count. Fix: pass steps (the baseline's base_steps)")
            return math.exp(self.empirical.mu(image_tokens, steps))
        if self.dynamic is None:
            return self.shift
        return math.exp(self.dynamic.mu(image_tokens))

    def config(self) -> dict[str, Any]:
        """Constructor arguments of diffusers' ``FlowMatchEulerDiscreteScheduler``."""
        config: dict[str, Any] = {"num_train_timesteps": self.num_train_timesteps, "shift": self.shift}
        if self.dynamic is not None:
            config.update(
                use_dynamic_shifting=True,
                base_shift=self.dynamic.base_shift,
                max_shift=self.dynamic.max_shift,
                base_image_seq_len=self.dynamic.base_image_seq_len,
                max_image_seq_len=self.dynamic.max_image_seq_len,
            )
        if self.shift_terminal is not None:
            config["shift_terminal"] = self.shift_terminal
        return config


# ----------------------------------------------------------------------------------------
# The networks of a pipeline (diffusers / transformers constructor arguments).
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a pipeline and the sequence length it is run at."""

    label: str
    model_class: str  # a transformers class name
    config: dict[str, Any]
    tokens: int


@dataclass(frozen=True)
class Architecture:
    """The three networks of one pipeline, as configs (no weights)."""

    transformer_class: str  # a diffusers class name
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[TextEncoder, ...]
    vae_class: str = "AutoencoderKL"  # a diffusers class name


FLUX_DEV_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
SD3_MEDIUM_TRANSFORMER: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
)
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = dict(
    SD3_MEDIUM_TRANSFORMER, pos_embed_max_size=384, qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)
SD35_LARGE_TRANSFORMER: dict[str, Any] = dict(
    SD3_MEDIUM_TRANSFORMER, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
    qk_norm="rms_norm",
)

#: FLUX.1 and SD3/SD3.5 ship VAEs of the same shape: 16 latent channels, four blocks (an 8x
#: downsampling), no quant convs.  Only the latent scaling and shift differ (below).
VAE_16CH: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
    use_post_quant_conv=False,
)
FLUX_VAE: dict[str, Any] = dict(VAE_16CH, scaling_factor=0.3611, shift_factor=0.1159)
SD3_VAE: dict[str, Any] = dict(VAE_16CH, scaling_factor=1.5305, shift_factor=0.0609)

CLIP_L: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
OPENCLIP_BIGG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
T5_XXL: dict[str, Any] = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
    relative_attention_max_distance=128, is_encoder_decoder=False, use_cache=False,
)

_FLUX_TEXT = (
    # FLUX uses CLIP-L for its pooled vector only, but the whole 77-token model runs.
    TextEncoder("clip-l", "CLIPTextModel", CLIP_L, 77),
    TextEncoder("t5-xxl", "T5EncoderModel", T5_XXL, 512),
)
_SD3_TEXT = (
    TextEncoder("clip-l", "CLIPTextModelWithProjection", CLIP_L, 77),
    TextEncoder("clip-bigg", "CLIPTextModelWithProjection", OPENCLIP_BIGG, 77),
    TextEncoder("t5-xxl", "T5EncoderModel", T5_XXL, 256),
)

#: Chroma1-HD (lodestones/Chroma1-HD, transformer/config.json as published in the diffusers
#: folder, e.g. its mirror TensorStack/Chroma1-HD-ts): the FLUX.1 layout (19 dual + 38 single
#: blocks, 24 x 128 heads, packed 64-channel tokens, rope axes 16/56/56) with the modulation
#: approximator (64 input channels, 5 layers of 5120) and no pooled or guidance embedding.
CHROMA1_HD_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
    approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5,
)
#: Chroma runs one T5-XXL v1.1 encoder (its text_encoder folder) at ChromaPipeline's
#: max_sequence_length=512; its VAE is FLUX.1's (vae/config.json: 16 channels, 0.3611 / 0.1159).
_CHROMA_TEXT = (TextEncoder("t5-xxl", "T5EncoderModel", T5_XXL, 512),)
#: Chroma1-HD's scheduler/scheduler_config.json: FlowMatchEulerDiscreteScheduler with
#: shift 3.0 and use_dynamic_shifting false, so the mu ChromaPipeline computes is ignored by
#: the scheduler and every resolution samples at the static shift 3.0.
_CHROMA_SCHEDULER = Scheduler(shift=3.0)

# FLUX.2: the transformer configs are those diffusers' converter writes for the published
# checkpoints (scripts/convert_flux2_to_diffusers.py, get_flux2_transformer_config: "flux2-dev",
# "klein-4b"; the klein base and distilled checkpoints share an architecture), as in
# black-forest-labs/FLUX.2-dev and FLUX.2-klein-base-4B transformer/config.json.
FLUX2_DEV_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
    num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True,
)
FLUX2_KLEIN_4B_TRANSFORMER: dict[str, Any] = dict(
    FLUX2_DEV_TRANSFORMER, num_layers=5, num_single_layers=20, num_attention_heads=24,
    joint_attention_dim=7680, guidance_embeds=False,
)
#: AutoencoderKLFlux2 as the converter builds it (its constructor defaults, every FLUX.2
#: checkpoint's vae/config.json): 32 latent channels, an 8x downsampling, quant convs, and a
#: BatchNorm over the 2x2-patchified latent (128 channels) whose running statistics
#: normalise the transformer's tokens.
FLUX2_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=32, norm_num_groups=32, use_quant_conv=True,
    use_post_quant_conv=True, batch_norm_eps=1e-4, patch_size=(2, 2),
)
#: FLUX.2-dev's text encoder is Mistral Small 3.2 24B (Mistral3ForConditionalGeneration,
#: mistralai/Mistral-Small-3.2-24B-Instruct-2506 config.json text_config).  For a text prompt
#: its vision tower does not run; the language model runs all 40 layers (the embedding stacks
#: the hidden states after layers 10, 20 and 30) and its LM head (diffusers asks for no
#: logits_to_keep), so that is what is counted: the same computation as MistralForCausalLM.
MISTRAL_SMALL_3_TEXT: dict[str, Any] = dict(
    vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
    rope_theta=1000000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False,
)
#: FLUX.2 [klein] 4B's text encoder is Qwen3-4B (Qwen3ForCausalLM; Qwen/Qwen3-4B config.json,
#: as in FLUX.2-klein-4B/text_encoder/config.json): all 36 layers and the tied LM head run
#: (the embedding stacks the hidden states after layers 9, 18 and 27).
QWEN3_4B: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_cache=False,
)
#: Both pipelines pad the prompt to max_sequence_length = 512 tokens.
_FLUX2_TEXT = (TextEncoder("mistral-small-3.2", "MistralForCausalLM", MISTRAL_SMALL_3_TEXT, 512),)
_FLUX2_KLEIN_4B_TEXT = (TextEncoder("qwen3-4b", "Qwen3ForCausalLM", QWEN3_4B, 512),)


# Qwen-Image (Qwen/Qwen-Image on the Hugging Face Hub): transformer/config.json.
QWEN_IMAGE_TRANSFORMER: dict[str, Any] = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
#: Qwen/Qwen-Image vae/config.json (AutoencoderKLQwenImage, a causal 3-D VAE: 16 latent
#: channels, 8x spatial compression, per-channel latents_mean / latents_std instead of a
#: scaling factor and shift).
QWEN_IMAGE_VAE: dict[str, Any] = dict(
    # Lists, not tuples: the class concatenates them with lists.
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True],
    dropout=0.0,
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
)
#: Qwen/Qwen-Image text_encoder/config.json = Qwen/Qwen2.5-VL-7B-Instruct's config.json
#: (Qwen2_5_VLForConditionalGeneration; the vision tower is built but a text prompt never runs it).
QWEN25_VL_7B: dict[str, Any] = dict(
    text_config=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        tie_word_embeddings=False, use_cache=False,
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
    ),
    tie_word_embeddings=False,
)
#: Qwen-Image's prompt: QwenImagePipeline wraps it in a chat template (34 system-prompt tokens
#: the encoder runs and the pipeline then drops, and 5 closing tokens it keeps) and passes the
#: prompt's own tokens, unpadded.  The cost model takes a 123-token prompt: 128 text tokens in
#: the joint sequence, 162 through the encoder.
QWEN_IMAGE_TEXT_TOKENS = 128
_QWEN_IMAGE_TEXT = (TextEncoder("qwen2.5-vl-7b", "Qwen2_5_VLForConditionalGeneration", QWEN25_VL_7B, 34 + QWEN_IMAGE_TEXT_TOKENS),)


# ----------------------------------------------------------------------------------------
# Pipeline families: the RALU pipeline that runs a family's models.
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilySpec:
    """One pipeline family: the RALU pipeline class that runs its models, the diffusers
    pipelines whose folders it loads, and how its guidance is set.

    What the family's pipeline itself must supply (prompt encoding, token layout, positions,
    the velocity call, the decode) is the protocol of :mod:`ralu.runtime.family`; this record
    holds only the facts the rest of ralu reads without importing diffusers (``ralu-generate``
    choosing a class from ``model_index.json``, the lazy imports of :mod:`ralu.runtime`)."""

    #: Family name, as schedules record it (through their model's :class:`ModelSpec`).
    name: str
    #: Human name in messages and tables ("FLUX.1", "Stable Diffusion 3").
    title: str
    #: Module (under ``ralu.runtime``) and name of the RALU pipeline class.
    module: str
    pipeline: str
    #: ``model_index.json`` ``_class_name`` values of the diffusers pipelines it runs.
    base_pipelines: tuple[str, ...]
    #: Pipeline components ``--prompt`` needs (encoders and tokenizers; optional ones left out).
    text_components: tuple[str, ...]
    #: ``guidance_scale`` that ``ralu-generate`` passes when ``--guidance`` is not given.
    default_guidance: float
    #: The call argument whose value > 1 turns classifier-free guidance (and so the negative
    #: prompt) on: ``"true_cfg_scale"`` for guidance-distilled models that add true CFG on
    #: request (FLUX.1, Qwen-Image), ``"guidance_scale"`` for models that run CFG by default.
    cfg_argument: Literal["true_cfg_scale", "guidance_scale"]
    #: Whether the pipeline edits a reference image given as its ``image=`` argument
    #: (``ralu-generate --image``).
    reference_image: bool = False


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            "flux", "FLUX.1", "flux", "RALUFluxPipeline", ("FluxPipeline",),
            ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"), default_guidance=3.5, cfg_argument="true_cfg_scale",
        ),
        FamilySpec(
            # SD3's third encoder (T5) is optional in diffusers, so not required here.
            "sd3", "Stable Diffusion 3", "sd3", "RALUStableDiffusion3Pipeline", ("StableDiffusion3Pipeline",),
            ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"), default_guidance=7.0, cfg_argument="guidance_scale",
        ),
        FamilySpec(
            # FluxKontextPipeline's text stack and guidance are FluxPipeline's: guidance-distilled
            # (guidance_scale 3.5 is its default), true CFG on request with true_cfg_scale > 1.
            "flux-kontext", "FLUX.1 Kontext", "flux_kontext", "RALUFluxKontextPipeline", ("FluxKontextPipeline",),
            ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"), default_guidance=3.5, cfg_argument="true_cfg_scale",
            reference_image=True,
        ),
        FamilySpec(
            # Qwen-Image's transformer has no distilled guidance (guidance_embeds False): 1.0 is
            # "none"; CFG is true CFG (true_cfg_scale > 1 with a negative prompt).
            "qwen-image", "Qwen-Image", "qwenimage", "RALUQwenImagePipeline", ("QwenImagePipeline",),
            ("text_encoder", "tokenizer"), default_guidance=1.0, cfg_argument="true_cfg_scale",
        ),
        FamilySpec(
            # ChromaPipeline: one T5 encoder; true CFG on when guidance_scale > 1 (default 5.0).
            "chroma", "Chroma", "chroma", "RALUChromaPipeline", ("ChromaPipeline",),
            ("text_encoder", "tokenizer"), default_guidance=5.0, cfg_argument="guidance_scale",
        ),
        FamilySpec(
            # FLUX.2-dev is guidance-distilled (guidance_scale is embedded); true CFG on request
            # as in FLUX.1's pipeline (the base Flux2Pipeline has none).
            "flux2", "FLUX.2", "flux2", "RALUFlux2Pipeline", ("Flux2Pipeline",),
            ("text_encoder", "tokenizer"), default_guidance=4.0, cfg_argument="true_cfg_scale",
        ),
        FamilySpec(
            # The undistilled klein base models run CFG (guidance_scale > 1), as Flux2KleinPipeline.
            "flux2-klein", "FLUX.2 [klein]", "flux2", "RALUFlux2KleinPipeline", ("Flux2KleinPipeline",),
            ("text_encoder", "tokenizer"), default_guidance=4.0, cfg_argument="guidance_scale",
        ),
    )
}


def get_family(name: str) -> FamilySpec:
    """A family's record; unknown names get an error listing the families."""
    if name not in FAMILIES:
        raise ValueError(f"unknown pipeline family {name!r}. Fix: use one of {sorted(FAMILIES)}")
    return FAMILIES[name]


# ----------------------------------------------------------------------------------------
# The model record and the rules it implies.
# ----------------------------------------------------------------------------------------

#: Image tokens are 2x2 patches of the latent (FLUX packing, SD3 patch embedding).
TOKEN_PATCH = 2


def resolution_multiple(vae_scale_factor: int) -> int:
    """What height and width must be multiples of: the latent (pixels / ``vae_scale_factor``)
    is halved for the low-res stage, whose tokens are 2x2 patches."""
    return 2 * TOKEN_PATCH * vae_scale_factor


@dataclass(frozen=True)
class ModelSpec:
    """Everything ralu needs to know about one model."""

    #: Name a schedule file records ("flux-dev", "sd3-medium", ...).
    name: str
    #: Pipeline family that runs it.
    family: Family
    #: Steps of the baseline sampler (FLUX.1-dev 50, SD3 28: the paper's baselines).
    base_steps: int
    #: Whether the baseline runs classifier-free guidance (doubles every forward).
    cfg: bool
    #: Text tokens in the joint sequence (FLUX: T5 512; SD3: CLIP 77 + T5 256).
    text_tokens: int
    scheduler: Scheduler
    architecture: Architecture = field(repr=False)
    #: Image tokens of a conditioning image the transformer carries at full resolution in every
    #: forward besides the generated ones (FLUX.1 Kontext's reference image; 0: none).  The cost
    #: model counts them as image tokens of every forward, baseline and RALU alike.
    reference_tokens: int = 0

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel, as diffusers derives it from the VAE's blocks (Qwen-Image's
        3-D VAE: from its ``temperal_downsample`` stages, as ``QwenImagePipeline`` does)."""
        if "temperal_downsample" in self.architecture.vae:
            return 2 ** len(self.architecture.vae["temperal_downsample"])
        return 2 ** (len(self.architecture.vae["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        vae = self.architecture.vae
        return vae["z_dim"] if "z_dim" in vae else vae["latent_channels"]

    @property
    def resolution_multiple(self) -> int:
        return resolution_multiple(self.vae_scale_factor)

    def image_tokens(self, height: int, width: int) -> int:
        """Image tokens of one full-resolution forward: the latent cut into 2x2 patches."""
        check_resolution(height, width, self.resolution_multiple)
        side = TOKEN_PATCH * self.vae_scale_factor
        return (height // side) * (width // side)

    def base_shift(self, height: int, width: int, steps: int | None = None) -> float:
        """h0: the shift of the base model's own schedule at this resolution and step count
        (default: the baseline's ``base_steps``).  FLUX.1-dev: exp(mu) = 3.158 at 1024x1024;
        SD3: 3.0 at any size."""
        return self.scheduler.base_shift(self.image_tokens(height, width), self.base_steps if steps is None else steps)


_SD3_SCHEDULER = Scheduler(shift=3.0)
_FLUX2_SCHEDULER = Scheduler(
    shift=3.0, dynamic=DynamicShift(base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096), empirical=EmpiricalShift()
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "flux-dev", "flux", base_steps=50, cfg=False, text_tokens=512,
            scheduler=Scheduler(shift=3.0, dynamic=DynamicShift(base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)),
            architecture=Architecture("FluxTransformer2DModel", FLUX_DEV_TRANSFORMER, FLUX_VAE, _FLUX_TEXT),
        ),
        ModelSpec(
            # FLUX.1-Kontext-dev (black-forest-labs/FLUX.1-Kontext-dev): the FLUX.1-dev transformer,
            # VAE, text encoders and dynamic-shift scheduler (Black Forest Labs' reference code,
            # github.com/black-forest-labs/flux src/flux/util.py configs["flux-dev-kontext"]: the
            # flux-dev FluxParams and AutoEncoderParams; src/flux/sampling.py get_schedule: mu from
            # the generated image's tokens, 0.5 at 256 to 1.15 at 4096, as FluxKontextPipeline
            # computes it from the scheduler config).  Baseline: FluxKontextPipeline's defaults,
            # 28 steps, guidance 3.5, no true CFG.  Reference tokens: FluxKontextPipeline resizes
            # the reference to the nearest of PREFERRED_KONTEXT_RESOLUTIONS (all ~1 MP: 4042 to
            # 4150 tokens, whatever the output size), so the cost model counts a 1024x1024
            # reference, 4096 tokens, in every forward.
            "flux-kontext-dev", "flux-kontext", base_steps=28, cfg=False, text_tokens=512,
            scheduler=Scheduler(shift=3.0, dynamic=DynamicShift(base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)),
            architecture=Architecture("FluxTransformer2DModel", FLUX_DEV_TRANSFORMER, FLUX_VAE, _FLUX_TEXT),
            reference_tokens=4096,
        ),
        ModelSpec(
            "sd3-medium", "sd3", base_steps=28, cfg=True, text_tokens=333, scheduler=_SD3_SCHEDULER,
            architecture=Architecture("SD3Transformer2DModel", SD3_MEDIUM_TRANSFORMER, SD3_VAE, _SD3_TEXT),
        ),
        ModelSpec(
            "sd3.5-medium", "sd3", base_steps=28, cfg=True, text_tokens=333, scheduler=_SD3_SCHEDULER,
            architecture=Architecture("SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER, SD3_VAE, _SD3_TEXT),
        ),
        ModelSpec(
            "sd3.5-large", "sd3", base_steps=28, cfg=True, text_tokens=333, scheduler=_SD3_SCHEDULER,
            architecture=Architecture("SD3Transformer2DModel", SD35_LARGE_TRANSFORMER, SD3_VAE, _SD3_TEXT),
        ),
        ModelSpec(
            # QwenImagePipeline's defaults: 50 steps, true_cfg_scale 4.0 (the model card's call
            # passes a negative prompt, so the baseline runs true CFG).  Scheduler: Qwen/Qwen-Image
            # scheduler/scheduler_config.json (dynamic shifting 0.5..0.9 over 256..8192 tokens,
            # exponential time shift, shift_terminal 0.02).
            "qwen-image", "qwen-image", base_steps=50, cfg=True, text_tokens=QWEN_IMAGE_TEXT_TOKENS,
            scheduler=Scheduler(
                shift=1.0, dynamic=DynamicShift(base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192), shift_terminal=0.02
            ),
            architecture=Architecture("QwenImageTransformer2DModel", QWEN_IMAGE_TRANSFORMER, QWEN_IMAGE_VAE, _QWEN_IMAGE_TEXT, vae_class="AutoencoderKLQwenImage"),
        ),
        ModelSpec(
            # ChromaPipeline's defaults: 35 steps, guidance_scale 5.0 (> 1: true CFG, two
            # forwards per step); T5 at 512 tokens.
            "chroma", "chroma", base_steps=35, cfg=True, text_tokens=512, scheduler=_CHROMA_SCHEDULER,
            architecture=Architecture("ChromaTransformer2DModel", CHROMA1_HD_TRANSFORMER, FLUX_VAE, _CHROMA_TEXT),
        ),
        ModelSpec(
            # 50 steps, guidance 4.0: Flux2Pipeline's defaults.  The scheduler config is FLUX.1-dev's
            # (the converter reuses it); Flux2Pipeline overrides its mu with compute_empirical_mu.
            "flux2-dev", "flux2", base_steps=50, cfg=False, text_tokens=512, scheduler=_FLUX2_SCHEDULER,
            architecture=Architecture("Flux2Transformer2DModel", FLUX2_DEV_TRANSFORMER, FLUX2_VAE, _FLUX2_TEXT, vae_class="AutoencoderKLFlux2"),
        ),
        ModelSpec(
            # The undistilled klein 4B ("base"): 50 steps with CFG 4.0 (Flux2KleinPipeline's defaults).
            # The step-distilled FLUX.2-klein-4B samples in 4 steps: RALU has nothing to save there.
            "flux2-klein-base-4b", "flux2-klein", base_steps=50, cfg=True, text_tokens=512, scheduler=_FLUX2_SCHEDULER,
            architecture=Architecture("Flux2Transformer2DModel", FLUX2_KLEIN_4B_TRANSFORMER, FLUX2_VAE, _FLUX2_KLEIN_4B_TEXT, vae_class="AutoencoderKLFlux2"),
        ),
    )
}

#: Model names a schedule may name, and the pipeline family that runs them.
MODEL_FAMILIES: dict[str, str] = {name: spec.family for name, spec in MODELS.items()}

#: Short names accepted on the command line.
ALIASES: dict[str, str] = {"flux": "flux-dev", "kontext": "flux-kontext-dev", "sd3": "sd3-medium", "qwen": "qwen-image", "chroma1-hd": "chroma", "flux2": "flux2-dev", "flux2-klein": "flux2-klein-base-4b"}

#: A height or width every known model accepts (each model's multiple divides it).
RESOLUTION_MULTIPLE: int = math.lcm(*(spec.resolution_multiple for spec in MODELS.values()))


def get_model(name: str) -> ModelSpec:
    """Look a model up by name or alias; unknown names get an error listing the choices."""
    key = ALIASES.get(name, name)
    if key not in MODELS:
        choices = sorted(set(MODELS) | set(ALIASES))
        raise ValueError(f"unknown model {name!r}. Fix: use one of {choices}")
    return MODELS[key]


def pixel_size(label: str, value) -> int:
    """``value`` as a whole number of pixels: integers (numpy's too), and floats with no
    fractional part (a habit of callers that compute sizes, e.g. ``256.0``); anything else,
    booleans included, is refused with a one-line ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{label}={value!r} must be an integer number of pixels. Fix: pass e.g. {label}=1024")
    if not isinstance(value, numbers.Integral) and not (math.isfinite(value) and float(value).is_integer()):
        suggestion = max(1, round(value)) if math.isfinite(value) else 1024
        raise ValueError(f"{label}={value!r} must be an integer number of pixels. Fix: pass e.g. {label}={suggestion}")
    return int(value)


def check_resolution(height, width, multiple: int = RESOLUTION_MULTIPLE) -> None:
    """Height and width must be whole (:func:`pixel_size`), positive multiples of ``multiple``
    (see :func:`resolution_multiple`; 32 for an 8x VAE)."""
    for label, value in (("height", height), ("width", width)):
        value = pixel_size(label, value)
        if value <= 0 or value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple)
            raise ValueError(
                f"{label}={value!r} must be a positive multiple of {multiple}: the latent is halved for the "
                f"low-res stage and cut into 2x2 tokens. Fix: use e.g. {label}={nearest}"
            )


# ----------------------------------------------------------------------------------------
# Token counts of the stages (the same for every model: counts of 2x2 latent patches).
# ----------------------------------------------------------------------------------------


def upsampled_tokens(low_tokens: int, up_ratio: float) -> int:
    """k = floor(r * M/4): low-res tokens the mixed stage replaces by their four children."""
    return math.floor(up_ratio * low_tokens)


def stage_image_tokens(full_tokens: int, up_ratio: float, n_stages: int) -> list[int]:
    """Image tokens per stage: ``M/4, M/4 + 3k, M`` for three stages (k = floor(r M/4)).

    With two stages there is no mixed stage (``M/4, M``); with one, full resolution only.
    """
    low = full_tokens // 4
    if n_stages == 1:
        return [full_tokens]
    if n_stages == 2:
        return [low, full_tokens]
    if n_stages == 3:
        return [low, low + 3 * upsampled_tokens(low, up_ratio), full_tokens]
    raise ValueError(f"{n_stages} stages: the runtime knows 1, 2 or 3 (low, mixed, full resolution)")
