"""Second-order weight rounding (GPTQ) with a mask-weighted Hessian.

A layer is linear in its weight: every output value is y[o, p] = sum_j W2[o, j] X[p, j] with
W2 the weight as a matrix [C_out, columns] and X[p] the input patch (im2col) that output
position p reads. GPTQ rounds the columns of W2 one after another and spreads each
column's rounding error over the columns not yet rounded, through the inverse of

    H = 2 sum_p m_p X[p] X[p]^T,

the Hessian of the masked output error sum_p m_p |(W2 - Q) X[p]|^2. The weights m_p are
POCA's output mask (camera visibility x shape-wise std mask) at position p: positions no
camera sees do not pull the rounding. Columns whose H diagonal is 0 (inputs that are zero
wherever it matters) round to nearest.

Columns are ordered (kernel tap, input channel), so a block of input channels of one tap
is a run of consecutive columns: the layout of ONNX's blocked DequantizeLinear scales,
which stay fixed (computed before GPTQ) while it picks the integers.

Patches: Conv2d via ``unfold``; ConvTranspose2d(k, s, p) as the stride-1 convolution of the
zero-stuffed input (s - 1 zeros between inputs, k - 1 - p padding) with the flipped kernel
(for k4 s2 p1 this splits into the four output phases of docs/deploy: H is block-diagonal
by phase); Linear: X is the input itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avatarq.calibration.quantizers import FloatGrid, IntRange
from avatarq.errors import AvatarqError

HESSIAN_BATCH = 16
GPTQ_BLOCK = 128


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def supported(module: nn.Module) -> bool:
    """Whether `patches` can express ``module``'s input patches."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        if module.groups != 1 or _pair(module.dilation) != (1, 1):
            return False
        if isinstance(module, nn.ConvTranspose2d):
            return _pair(module.output_padding) == (0, 0)
        return isinstance(module.padding, (tuple, list, int))
    return False


def to_matrix(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A layer weight as W2 [C_out, columns], columns ordered (tap, input channel)."""
    if kind == "linear":
        return weight
    if kind == "conv":  # [Cout, Cin, kh, kw] -> [Cout, kh, kw, Cin]
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    if kind == "conv_transpose":  # [Cin, Cout, kh, kw] -> [Cout, kh, kw, Cin]
        return weight.permute(1, 2, 3, 0).reshape(weight.shape[1], -1)
    raise AvatarqError(f"GPTQ does not know layer kind {kind!r}")


def from_matrix(matrix: torch.Tensor, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `to_matrix` for a weight of ``shape``."""
    if kind == "linear":
        return matrix.reshape(shape)
    if kind == "conv":
        cout, cin, kh, kw = shape
        return matrix.reshape(cout, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
    cin, cout, kh, kw = shape
    return matrix.reshape(cout, kh, kw, cin).permute(3, 0, 1, 2).contiguous()


def patches(module: nn.Module, x: torch.Tensor, cin: int | None = None) -> torch.Tensor:
    """Input patches of every output position: [B, columns, L] (L = output H * W) for a
    conv layer, columns in `to_matrix` order; [B, columns] for a Linear layer. ``cin``: the
    input channels of ``x`` (rotated layers have more than the module says)."""
    if isinstance(module, nn.Linear):
        return x
    kh, kw = _pair(module.kernel_size)
    c = cin if cin is not None else x.shape[1]
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, (kh, kw), padding=_pair(module.padding), stride=_pair(module.stride))
        taps = [(i, j) for i in range(kh) for j in range(kw)]
    else:
        sh, sw = _pair(module.stride)
        ph, pw = _pair(module.padding)
        b, _, h, w = x.shape
        stuffed = x.new_zeros(b, c, (h - 1) * sh + 1, (w - 1) * sw + 1)
        stuffed[:, :, ::sh, ::sw] = x
        stuffed = F.pad(stuffed, (kw - 1 - pw, kw - 1 - pw, kh - 1 - ph, kh - 1 - ph))
        cols = F.unfold(stuffed, (kh, kw))
        taps = [(kh - 1 - i, kw - 1 - j) for i in range(kh) for j in range(kw)]
    # unfold order is (channel, i, j); W2 order is (tap, channel)
    index = torch.empty(c * kh * kw, dtype=torch.long)
    for t, (a, b_) in enumerate(taps):
        for ch in range(c):
            index[(a * kw + b_) * c + ch] = ch * kh * kw + t
    return cols[:, index]


@dataclass
class HessianAccumulator:
    """H = 2 sum_p m_p X[p] X[p]^T, summed over calls (float64 [columns, columns])."""

    columns: int
    h: torch.Tensor | None = None
    weight: float = 0.0

    def add(self, rows: torch.Tensor, m: torch.Tensor | None = None) -> None:
        """rows float32 [P, columns]; m float32 [P] (None: all 1)."""
        rows = rows.float()
        if m is not None:
            rows = rows * m.float().sqrt()[:, None]
            self.weight += float(m.sum())
        else:
            self.weight += rows.shape[0]
        # float32 products per batch (what GPTQ implementations use), summed in float64
        update = (2.0 * rows.t() @ rows).double()
        self.h = update if self.h is None else self.h + update


# ConvTranspose(k4, s2, p1): output phase (a, b), i.e. the texels (2m + a, 2k + b), is a
# stride-1 2x2 convolution of the input with the taps TAPS[a] x TAPS[b] and pads (top,
# left, bottom, right) = (1 - a, 1 - b, a, b) (docs/engines.md, the ONNX Runtime rewrite).
PHASE_TAPS = ((3, 1), (2, 0))


def _is_k4s2p1(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.ConvTranspose2d)
        and _pair(module.kernel_size) == (4, 4)
        and _pair(module.stride) == (2, 2)
        and _pair(module.padding) == (1, 1)
        and _pair(module.output_padding) == (0, 0)
        and module.groups == 1
    )


def _phase_hessian(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    window: tuple[int, int] | None,
    acc: HessianAccumulator,
) -> None:
    """Add one batch of a k4s2p1 ConvTranspose to ``acc``, phase by phase: each phase's
    4 x Cin columns form one diagonal block of H (the other blocks are 0), so this is the
    stuffed-input H without multiplying the stuffed zeros. Patches are built from four
    shifted views (torch's CPU ``unfold`` is several times slower)."""
    b, c, h, w = x.shape
    if acc.h is None:
        acc.h = torch.zeros(16 * c, 16 * c, dtype=torch.float64)
    for a in (0, 1):
        for bb in (0, 1):
            xp = F.pad(x, (1 - bb, bb, 1 - a, a))
            cols = torch.stack(
                [xp[:, :, i : i + h, j : j + w] for i in (0, 1) for j in (0, 1)], dim=2
            )  # [B, C, 4, h, w]: unfold's (channel, i, j) order
            if window is not None:
                s, n = window
                cols = cols[..., s // 2 : (s + n) // 2, s // 2 : (s + n) // 2]
            cols = cols.reshape(b, c * 4, -1)
            if mask is not None:
                m = mask[:, :, a::2, bb::2].reshape(b, 1, -1)
                cols = cols * m.sqrt()
                acc.weight += float(m.sum())
            else:
                acc.weight += b * cols.shape[-1]
            block = 2.0 * torch.einsum("bkp,blp->kl", cols, cols).double()
            # unfold order (channel, i, j) -> W2 columns (tap (TAPS[a][i], TAPS[bb][j]), channel)
            index = torch.tensor(
                [
                    (PHASE_TAPS[a][i] * 4 + PHASE_TAPS[bb][j]) * c + ch
                    for ch in range(c)
                    for i in range(2)
                    for j in range(2)
                ]
            )
            acc.h[index[:, None], index[None, :]] += block


def layer_hessian(
    module: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    window: tuple[int, int] | None,
    rotate=None,
) -> torch.Tensor:
    """Mask-weighted H of one layer from its cached items.

    Args:
        module: the (plain) layer.
        x: float32 [I, *in] cached inputs (crops for cropped layers).
        mask: float32 [I, 1, h, w] output mask of the cached output window, or None.
        window: (start, size) of the cached output window inside the layer's output on
            ``x`` (crops), or None for the whole output.
        rotate: a function applied to a batch of inputs first (the Hadamard rotation).

    Returns:
        float64 [columns, columns].
    """
    acc = None
    for start in range(0, x.shape[0], HESSIAN_BATCH):
        xb = x[start : start + HESSIAN_BATCH]
        if rotate is not None:
            xb = rotate(xb)
        mb = None if mask is None else mask[start : start + HESSIAN_BATCH]
        if _is_k4s2p1(module) and (window is None or window[0] % 2 == 0):
            acc = acc or HessianAccumulator(16 * xb.shape[1])
            _phase_hessian(xb, mb, window, acc)
            continue
        p = patches(module, xb, xb.shape[1] if xb.dim() == 4 else None)
        if acc is None:
            acc = HessianAccumulator(p.shape[1])
        if p.dim() == 2:
            acc.add(p)
            continue
        b, cols, _ = p.shape
        oh, ow = _output_size(module, xb)
        p = p.reshape(b, cols, oh, ow)
        if window is not None:
            s, n = window
            p = p[:, :, s : s + n, s : s + n]
        rows = p.permute(0, 2, 3, 1).reshape(-1, cols)
        m = None
        if mb is not None:
            m = mb.reshape(-1)
            keep = m > 0
            rows, m = rows[keep], m[keep]
        acc.add(rows, m)
    if acc is None or acc.h is None:
        raise AvatarqError("GPTQ needs at least one calibration item")
    return acc.h


def _output_size(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    kh, kw = _pair(module.kernel_size)
    sh, sw = _pair(module.stride)
    ph, pw = _pair(module.padding)
    h, w = x.shape[-2:]
    if isinstance(module, nn.ConvTranspose2d):
        return (h - 1) * sh - 2 * ph + kh, (w - 1) * sw - 2 * pw + kw
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def gptq_round(
    weight2d: torch.Tensor,
    scale2d: torch.Tensor,
    hessian: torch.Tensor,
    grid: IntRange,
    damp: float = 0.01,
    act_order: bool = True,
    block: int = GPTQ_BLOCK,
) -> torch.Tensor:
    """GPTQ integers of W2 [rows, columns] on ``grid`` with fixed scales ``scale2d`` (same
    shape as W2), Hessian [columns, columns]. Returns float32 integers [rows, columns].

    Columns are rounded in order of decreasing H diagonal (``act_order``) or as given;
    ``damp`` x mean(diag H) is added to the diagonal before inverting.
    """
    if isinstance(grid, FloatGrid):
        raise AvatarqError("GPTQ rounds to an integer grid; fp8 weights round to nearest")
    w = weight2d.detach().double().clone()
    s = scale2d.detach().double()
    h = hessian.detach().double().clone()
    cols = w.shape[1]
    if h.shape != (cols, cols) or s.shape != w.shape:
        raise AvatarqError(f"GPTQ shapes: weight {list(w.shape)}, H {list(h.shape)}")
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    diag = torch.diag(h)
    h += torch.eye(cols, dtype=h.dtype) * (
        damp * float(diag[~dead].mean() if (~dead).any() else 1.0)
    )
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(cols)
    w, s, h = w[:, perm], s[:, perm], h[perm][:, perm]
    dead = dead[perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_out = torch.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = torch.clamp(torch.round(col / s[:, i1 + i]), grid.qmin, grid.qmax)
            q_out[:, i1 + i] = q
            if dead[i1 + i]:
                continue
            e = (col - q * s[:, i1 + i]) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(q_out)
    out[:, perm] = q_out
    return out.float()


def masked_output_error(
    weight2d: torch.Tensor, approx2d: torch.Tensor, hessian: torch.Tensor
) -> float:
    """tr((W - Q) H (W - Q)^T) / 2: the masked output squared error of replacing the weight
    W2 by ``approx2d`` on the data H was built from."""
    d = weight2d.double() - approx2d.double()
    return float(torch.einsum("oi,ij,oj->", d, hessian.double(), d) / 2.0)


def nearest_integers(weight2d: torch.Tensor, scale2d: torch.Tensor, grid: IntRange) -> torch.Tensor:
    """Round-to-nearest integers of W2 (float32), the baseline GPTQ improves on."""
    return torch.clamp(torch.round(weight2d / scale2d), grid.qmin, grid.qmax)
