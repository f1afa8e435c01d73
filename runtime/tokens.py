"""Mixed-resolution latents as token sequences (family-independent; torch only).

Geometry
--------
Both FLUX (packing) and SD3 (patch embedding) turn a latent image of shape ``(C, H, W)``
into tokens of 2x2 latent pixels.  RALU works with two token sizes:

* a *full-res token* covers 2x2 full-resolution latent pixels (grid ``H/2 x W/2``);
* a *low-res token* covers 2x2 pixels of the half-size latent, that is a 4x4 *cell* of
  full-resolution latent pixels (grid ``gh x gw = H/4 x W/4``).

Upsampling a low-res token (i, j) replaces it by its four *children*, the full-res tokens
(2i + dy, 2j + dx), dy, dx in {0, 1}.

State between stages: the canvas
--------------------------------
Between stages the latent is held as a full-resolution *canvas* ``(B, C, H, W)`` plus a
per-image boolean ``full_mask`` over the low-res token grid ``(B, gh, gw)`` (True where the
token is represented by its full-res children).  Low-res parts of the canvas are stored
nearest-upsampled (every half-size latent pixel copied into its 2x2 block), so the canvas
*is* ``Up(x)`` and the half-size latent is ``canvas[..., ::2, ::2]``.

Within a stage the state is a token sequence of *patches* ``(B, N, C, 2, 2)`` (FLUX's
packed token is ``patch.flatten()``: channel order c, dy, dx).  :class:`TokenLayout` says
which tokens a stage carries, in which order, and where they sit:

* order: the low-res tokens that are still low-res, in raster order of the low-res grid,
  followed by the full-res tokens, in raster order of the full-res grid;
* every image of a batch carries the same number of tokens (only which ones differ), so a
  batch is always one dense tensor.

Positions (coordinate convention)
---------------------------------
Positions are ``(row, col)`` in float32, in units of the stage's *base grid*:

* roles ``"low"`` and ``"mixed"``: the low-res token grid.  Low-res token (i, j) sits at
  (i, j); a full-res token (r, c) at (r / 2, c / 2), so the child (dy, dx) of (i, j) sits at
  (i + dy / 2, j + dx / 2).  Stage 1 therefore looks exactly like a native half-size image.
* role ``"full"``: the full-res token grid, token (r, c) at (r, c): positions of a native
  full-size image (everything doubled relative to the low-res units).
"""

from __future__ import annotations

import torch

from .compat import PaperCompat
from .models import TOKEN_PATCH

ROLES = ("low", "mixed", "full")


def patchify(latent: torch.Tensor, patch_size: int = TOKEN_PATCH) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/p * W/p, C, p, p)``: p x p patches in raster order (p = 2:
    FLUX's packing and SD3's patch embedding)."""
    b, c, h, w = latent.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"latent {h}x{w} is not divisible by the patch size {patch_size}")
    p = patch_size
    patches = latent.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // p) * (w // p), c, p, p)


def unpatchify(patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a latent of ``height x width`` pixels (the patch size
    is read from ``patches``)."""
    b, count, c, p = patches.shape[:4]
    if height % p or width % p or count != (height // p) * (width // p):
        raise ValueError(f"{count} patches of {p}x{p} cannot fill a {height}x{width} latent")
    latent = patches.reshape(b, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return latent.reshape(b, c, height, width)


def upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    """2x nearest upsampling of the last two dimensions (every pixel becomes a 2x2 block)."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def block_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over 2x2 pixel blocks of the last two dimensions: ``(..., H, W) -> (..., H/2, W/2)``."""
    *lead, h, w = x.shape
    return x.reshape(*lead, h // 2, 2, w // 2, 2).sum(dim=(-3, -1))


def expand_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat a ``(B, h, w)`` mask ``factor`` times along both grid axes."""
    return mask.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def initial_canvas(noise: torch.Tensor, role: str, compat: PaperCompat = PaperCompat()) -> torch.Tensor:
    """The first stage's canvas from full-resolution noise ``(B, C, H, W)`` ~ N(0, I).

    A full-res first stage uses the noise as is.  A low-res first stage uses
    ``block_sum(noise) / 2`` (exactly N(0, I) per half-size pixel; every drawn value counts)
    nearest-upsampled: the half-size noise is a deterministic function of the noise the base
    pipeline would draw.  ``compat.subsample_noise`` takes ``noise[..., ::2, ::2]`` instead,
    as the published script does.
    """
    if role == "full":
        return noise
    half = noise[..., ::2, ::2] if compat.subsample_noise else block_sum(noise) / 2.0
    return upsample_nearest(half)


class TokenLayout:
    """Which tokens one stage carries for each image of a batch, their order and positions.

    ``full_mask`` is a ``(B, gh, gw)`` bool tensor over the low-res token grid: True where the
    low-res token is replaced by its four full-res children.  Every image must have the same
    number of True entries.  ``role`` is ``"low"``, ``"mixed"`` or ``"full"`` (it fixes the
    position units, see the module docstring).
    """

    def __init__(self, full_mask: torch.Tensor, role: str):
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {ROLES}")
        if full_mask.ndim != 3 or full_mask.dtype != torch.bool:
            raise ValueError("full_mask must be a (batch, grid_height, grid_width) bool tensor")
        counts = full_mask.flatten(1).sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"every image must upsample the same number of tokens, got {counts.tolist()}")
        self.full_mask = full_mask
        self.role = role
        b, gh, gw = full_mask.shape
        self.batch, self.grid = b, (gh, gw)
        self.num_full_parents = int(counts[0])
        self.num_low = gh * gw - self.num_full_parents
        self.num_full = 4 * self.num_full_parents
        # Stable sorts: False before True, ties in raster order.
        flat = full_mask.flatten(1).to(torch.uint8)
        self.low_index = torch.argsort(flat, dim=1, stable=True)[:, : self.num_low]
        fine = expand_mask(full_mask, 2).flatten(1).to(torch.uint8)
        self.full_index = torch.argsort(1 - fine, dim=1, stable=True)[:, : self.num_full]
        self._batch_index = torch.arange(b, device=full_mask.device)[:, None]

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def low(cls, batch: int, grid: tuple[int, int], device=None) -> TokenLayout:
        """Every token low-res (stage 1)."""
        return cls(torch.zeros(batch, *grid, dtype=torch.bool, device=device), "low")

    @classmethod
    def full(cls, batch: int, grid: tuple[int, int], device=None) -> TokenLayout:
        """Every token full-res (last stage): the native full-size token sequence."""
        return cls(torch.ones(batch, *grid, dtype=torch.bool, device=device), "full")

    @classmethod
    def from_selection(cls, selected: torch.Tensor, grid: tuple[int, int], role: str = "mixed") -> TokenLayout:
        """Mixed layout: the low-res tokens with flat indices ``selected`` ``(B, k)`` upsampled."""
        b = selected.shape[0]
        mask = torch.zeros(b, grid[0] * grid[1], dtype=torch.bool, device=selected.device)
        mask[torch.arange(b, device=selected.device)[:, None], selected] = True
        return cls(mask.reshape(b, *grid), role)

    # -- properties -----------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """Tokens per image: ``M/4 + 3k`` for k upsampled low-res tokens."""
        return self.num_low + self.num_full

    @property
    def latent_size(self) -> tuple[int, int]:
        """Full-resolution latent height and width in pixels."""
        return 4 * self.grid[0], 4 * self.grid[1]

    @property
    def shared(self) -> bool:
        """Whether every image of the batch carries the same tokens (one position set)."""
        return bool((self.full_mask == self.full_mask[:1]).all())

    def pixel_mask(self) -> torch.Tensor:
        """``(B, 1, H, W)`` bool: full-resolution latent pixels held at full resolution."""
        return expand_mask(self.full_mask, 4)[:, None]

    # -- positions ------------------------------------------------------------------------

    def positions(self) -> torch.Tensor:
        """``(B, N, 2)`` float32 (row, col) of every token, in the units of the module docstring."""
        gh, gw = self.grid
        low = torch.stack([self.low_index // gw, self.low_index % gw], dim=-1).float()
        full = torch.stack([self.full_index // (2 * gw), self.full_index % (2 * gw)], dim=-1).float()
        if self.role != "full":
            full = full / 2.0
        return torch.cat([low, full], dim=1)

    # -- canvas <-> tokens ----------------------------------------------------------------

    def gather(self, canvas: torch.Tensor) -> torch.Tensor:
        """Token patches ``(B, N, C, 2, 2)`` of this layout, read from a canvas ``(B, C, H, W)``."""
        parts = []
        if self.num_low:
            parts.append(patchify(canvas[:, :, ::2, ::2])[self._batch_index, self.low_index])
        if self.num_full:
            parts.append(patchify(canvas)[self._batch_index, self.full_index])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def scatter(self, patches: torch.Tensor) -> torch.Tensor:
        """The canvas ``(B, C, H, W)`` of token patches ``(B, N, C, 2, 2)`` (low-res parts
        nearest-upsampled)."""
        gh, gw = self.grid
        b, _, c = patches.shape[:3]
        # A single-resolution layout's index is a permutation of its whole grid: every slot is
        # written, and the other resolution's canvas is not needed.
        if not self.num_full:
            low = patches.new_empty(b, gh * gw, c, 2, 2)
            low[self._batch_index, self.low_index] = patches
            return upsample_nearest(unpatchify(low, 2 * gh, 2 * gw))
        if not self.num_low:
            full = patches.new_empty(b, 4 * gh * gw, c, 2, 2)
            full[self._batch_index, self.full_index] = patches
            return unpatchify(full, 4 * gh, 4 * gw)
        low = patches.new_zeros(b, gh * gw, c, 2, 2)
        low[self._batch_index, self.low_index] = patches[:, : self.num_low]
        full = patches.new_zeros(b, 4 * gh * gw, c, 2, 2)
        full[self._batch_index, self.full_index] = patches[:, self.num_low :]
        low_canvas = upsample_nearest(unpatchify(low, 2 * gh, 2 * gw))
        full_canvas = unpatchify(full, 4 * gh, 4 * gw)
        return torch.where(self.pixel_mask(), full_canvas, low_canvas)

    def __repr__(self) -> str:
        return f"TokenLayout(role={self.role!r}, batch={self.batch}, grid={self.grid}, low={self.num_low}, full={self.num_full})"
