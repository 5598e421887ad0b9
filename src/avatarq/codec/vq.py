"""Vector quantization of the latent stream: residual, optionally product, codebooks.

Telepresence sends the latent code z of every frame. A `Codebook` turns z float32 [Z] into
a few integer codes and back:

- **product** split: z's Z dimensions are cut into G equal groups of D = Z / G
  consecutive dimensions (G = 1: plain VQ; G = Z: one scalar quantizer per dimension);
- **residual** stages: each group is coded by S stages of K centroids; stage s codes what
  stages 1..s-1 left, and the decoded group is the sum of the chosen centroids;
- every stage after the first holds the **zero vector at index 0**, so a stage can always
  leave its input alone: adding a stage never increases any frame's error (exactly, in
  the float64 arithmetic `encode` and `decode` share).

A frame costs G * S * ceil(log2 K) bits (`Codebook.bits_per_frame`); `pack_codes` writes
that many bits per frame (most significant bit first, each frame padded to whole bytes).

Training (`train_codebook`) is k-means (Lloyd's algorithm, k-means++ seeding) per group
and stage on the residuals the earlier stages leave on the training latents, seeded:
the same latents, config and seed give byte-identical centroids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avatarq.core.files import atomic_path
from avatarq.core.npz import load_npz
from avatarq.errors import AvatarqError

CODEBOOK_VERSION = 1
MAX_CODEBOOK_SIZE = 65536  # codes are stored as uint16
_CHUNK_ELEMENTS = 1 << 22  # float64 elements of one [B, K, D] distance block


def _integer(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise AvatarqError(f"{name} must be an integer, got {value!r}")
    if value < low or high is not None and value > high:
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise AvatarqError(f"{name} must be {bound}, got {value}")
    return int(value)


@dataclass(frozen=True)
class VQConfig:
    """How a codebook is trained.

    Attributes:
        codebook_size: K, centroids per stage (2..65536); ceil(log2 K) bits per code.
        stages: S, residual stages (1..16).
        groups: G, product groups over z's dimensions (must divide Z).
        iters: most Lloyd iterations per stage (stops early when no assignment changes).
        seed: seed of the k-means++ draws.
    """

    codebook_size: int = 256
    stages: int = 1
    groups: int = 1
    iters: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        _integer("--codebook (codebook size)", self.codebook_size, 2, MAX_CODEBOOK_SIZE)
        _integer("--stages", self.stages, 1, 16)
        _integer("--groups", self.groups, 1)
        _integer("--iters", self.iters, 1, 10_000)
        _integer("--seed", self.seed, 0, 2**32 - 1)


@dataclass(frozen=True, eq=False)
class Codebook:
    """Residual product codebooks of the latent stream.

    Attributes:
        centroids: float32 [G, S, K, D]; stages s >= 1 have ``centroids[:, s, 0] == 0``.
        train_mse: mean squared error of z (per dimension, latent units) on the training
            latents after each stage, float [S] (non-increasing).
        frames: number of training latents.
        seed: the training seed.
        source: one line naming the training latents.
    """

    centroids: np.ndarray
    train_mse: tuple[float, ...] = ()
    frames: int = 0
    seed: int = 0
    source: str = ""
    version: int = field(default=CODEBOOK_VERSION)

    def __post_init__(self) -> None:
        c = self.centroids
        if not isinstance(c, np.ndarray) or c.ndim != 4 or c.dtype != np.float32:
            raise AvatarqError(
                "codebook centroids must be float32 [groups, stages, K, dims], got "
                f"{getattr(c, 'dtype', type(c).__name__)} {list(getattr(c, 'shape', []))}"
            )
        g, s, k, d = c.shape
        if g < 1 or s < 1 or d < 1 or not 2 <= k <= MAX_CODEBOOK_SIZE:
            raise AvatarqError(
                f"codebook centroids have shape {list(c.shape)}; expected at least 1 group, "
                f"stage and dimension and 2..{MAX_CODEBOOK_SIZE} centroids per stage"
            )
        if not np.isfinite(c).all():
            raise AvatarqError("codebook centroids hold NaN or infinite values")
        if s > 1 and np.any(c[:, 1:, 0] != 0):
            raise AvatarqError(
                "codebook stages after the first must hold the zero vector at index 0"
            )
        if self.version != CODEBOOK_VERSION:
            raise AvatarqError(
                f"codebook version {self.version!r} is not supported (expected "
                f"{CODEBOOK_VERSION}); retrain it with this avatarq"
            )
        c = c.copy()  # the codebook owns its centroids, read-only
        c.setflags(write=False)
        object.__setattr__(self, "centroids", c)

    # -- shape

    @property
    def groups(self) -> int:
        return self.centroids.shape[0]

    @property
    def stages(self) -> int:
        return self.centroids.shape[1]

    @property
    def codebook_size(self) -> int:
        return self.centroids.shape[2]

    @property
    def group_dims(self) -> int:
        return self.centroids.shape[3]

    @property
    def z_dim(self) -> int:
        return self.groups * self.group_dims

    @property
    def bits_per_code(self) -> int:
        return max(1, math.ceil(math.log2(self.codebook_size)))

    @property
    def bits_per_frame(self) -> int:
        """G * S * ceil(log2 K): the payload of one frame's codes."""
        return self.groups * self.stages * self.bits_per_code

    @property
    def bytes_per_frame(self) -> int:
        """`pack_codes` bytes per frame (bits rounded up to whole bytes)."""
        return (self.bits_per_frame + 7) // 8

    def describe(self) -> str:
        return (
            f"K {self.codebook_size} x {self.stages} stage(s) x {self.groups} group(s) of "
            f"{self.group_dims} dims: {self.bits_per_frame} bits/frame"
        )

    # -- coding

    def _check_z(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z)
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise AvatarqError(
                f"z must be [B, {self.z_dim}] for this codebook, got {list(z.shape)}"
            )
        if not np.issubdtype(z.dtype, np.floating) or not np.isfinite(z).all():
            raise AvatarqError("z must hold finite floating-point values")
        return z.astype(np.float64)

    def check_codes(self, codes: np.ndarray, stages: int | None = None) -> np.ndarray:
        """``codes`` as int64 [B, G, S'] after checking shape and range (S' = ``stages``)."""
        codes = np.asarray(codes)
        s = self.stages if stages is None else stages
        if codes.ndim != 3 or codes.shape[1:] != (self.groups, s):
            raise AvatarqError(
                f"codes must be [B, {self.groups}, {s}] (frames, groups, stages), got "
                f"{list(codes.shape)}"
            )
        if codes.dtype.kind not in "iu":
            raise AvatarqError(f"codes must be integers, got {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise AvatarqError(
                f"codes must be in 0..{self.codebook_size - 1}, got {codes.min()}..{codes.max()}"
            )
        return codes.astype(np.int64)

    def encode(self, z: np.ndarray, stages: int | None = None) -> np.ndarray:
        """z float [B, Z] -> codes uint16 [B, G, S]: greedy residual coding.

        At stage s the chosen centroid minimizes ||z_g - (zhat_g + c)||^2 over the stage's
        centroids c (lowest index on ties), zhat_g being the float64 sum of the centroids
        chosen so far, exactly as `decode` forms it. ``stages`` codes only the first stages.
        """
        x = self._check_z(z)
        s_used = self.stages if stages is None else _integer("stages", stages, 1, self.stages)
        b, d = x.shape[0], self.group_dims
        codes = np.zeros((b, self.groups, s_used), np.uint16)
        for g in range(self.groups):
            target = x[:, g * d : (g + 1) * d]
            zhat = np.zeros_like(target)
            for s in range(s_used):
                table = self.centroids[g, s].astype(np.float64)
                idx = _nearest_exact(target, zhat, table)
                codes[:, g, s] = idx
                zhat = zhat + table[idx]
        return codes

    def decode(
        self, codes: np.ndarray, stages: int | None = None, dtype: type = np.float32
    ) -> np.ndarray:
        """codes [B, G, S] -> z [B, Z] (``dtype``): per group the float64 sum of the chosen
        centroids of the first ``stages`` stages (all by default)."""
        s_used = self.stages if stages is None else _integer("stages", stages, 1, self.stages)
        codes = np.asarray(codes)
        c = self.check_codes(codes, codes.shape[2] if codes.ndim == 3 else None)
        if c.shape[2] < s_used:
            raise AvatarqError(f"codes hold {c.shape[2]} stage(s), {s_used} asked for")
        b, d = c.shape[0], self.group_dims
        out = np.zeros((b, self.z_dim), np.float64)
        for g in range(self.groups):
            zhat = np.zeros((b, d), np.float64)
            for s in range(s_used):
                zhat = zhat + self.centroids[g, s].astype(np.float64)[c[:, g, s]]
            out[:, g * d : (g + 1) * d] = zhat
        return out.astype(dtype)

    def quantize(self, z: np.ndarray) -> np.ndarray:
        """decode(encode(z)): what the receiver's decoder gets, float32 [B, Z]."""
        return self.decode(self.encode(z))

    # -- files

    def save(self, path: str | Path) -> Path:
        """Write the codebook as an .npz (atomically); see `load_codebook`."""
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                format=np.asarray("avatarq-codebook"),
                version=np.asarray(self.version, np.int64),
                centroids=self.centroids,
                train_mse=np.asarray(self.train_mse, np.float64),
                frames=np.asarray(self.frames, np.int64),
                seed=np.asarray(self.seed, np.int64),
                source=np.asarray(self.source),
            )
        return path


def _nearest_exact(target: np.ndarray, zhat: np.ndarray, table: np.ndarray) -> np.ndarray:
    """argmin_k ||target - (zhat + table[k])||^2 per row (float64, direct differences)."""
    b, d = target.shape
    k = table.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // max(1, k * d))
    out = np.empty(b, np.int64)
    for start in range(0, b, rows):
        t, h = target[start : start + rows], zhat[start : start + rows]
        diff = t[:, None, :] - (h[:, None, :] + table[None, :, :])
        out[start : start + rows] = np.argmin(np.einsum("bkd,bkd->bk", diff, diff), axis=1)
    return out


def load_codebook(path: str | Path, what: str = "codebook") -> Codebook:
    """Read a codebook .npz written by `Codebook.save`; anything else is an AvatarqError
    naming the file and what is wrong."""
    path = Path(path)
    arrays = load_npz(path, what)
    expected = {"format", "version", "centroids", "train_mse", "frames", "seed", "source"}
    if set(arrays) != expected or str(arrays["format"]) != "avatarq-codebook":
        raise AvatarqError(
            f"{path} is not an avatarq codebook (expected the members {', '.join(sorted(expected))})"
        )
    try:
        scalars = {k: int(arrays[k]) for k in ("version", "frames", "seed")}
        train_mse = tuple(float(x) for x in np.asarray(arrays["train_mse"], np.float64).ravel())
    except (TypeError, ValueError):
        raise AvatarqError(f"{path}: version, frames and seed must be integers") from None
    try:
        book = Codebook(
            centroids=arrays["centroids"],
            train_mse=train_mse,
            frames=scalars["frames"],
            seed=scalars["seed"],
            source=str(arrays["source"]),
            version=scalars["version"],
        )
    except AvatarqError as exc:
        raise AvatarqError(f"{path}: {exc}") from None
    if len(train_mse) not in (0, book.stages):
        raise AvatarqError(
            f"{path}: train_mse has {len(train_mse)} value(s), the codebook {book.stages} stage(s)"
        )
    return book


# --------------------------------------------------------------------------- training


def train_codebook(
    latents: np.ndarray, config: VQConfig = VQConfig(), source: str = ""
) -> Codebook:
    """k-means residual product codebooks on ``latents`` float [N, Z] (see the module
    docstring). N must be at least K.

    Raises:
        AvatarqError: Z not divisible by the groups, fewer latents than K, non-finite values.
    """
    x = np.asarray(latents)
    if x.ndim != 2 or x.shape[0] == 0:
        raise AvatarqError(f"training latents must be [N, Z] with N > 0, got {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise AvatarqError("training latents must hold finite floating-point values")
    n, z_dim = x.shape
    if z_dim % config.groups:
        raise AvatarqError(f"--groups must divide z's {z_dim} dimensions, got {config.groups}")
    if n < config.codebook_size:
        raise AvatarqError(
            f"--codebook {config.codebook_size} needs at least {config.codebook_size} "
            f"training latents, got {n}; lower --codebook or add capture frames"
        )
    x = x.astype(np.float64)
    d = z_dim // config.groups
    k = config.codebook_size
    centroids = np.zeros((config.groups, config.stages, k, d), np.float32)
    sq_err = np.zeros(config.stages)
    for g in range(config.groups):
        target = x[:, g * d : (g + 1) * d]
        zhat = np.zeros_like(target)
        for s in range(config.stages):
            rng = np.random.default_rng([config.seed, g, s])
            table = _kmeans(target - zhat, k, config.iters, rng, pin_zero=s > 0)
            centroids[g, s] = table
            table64 = table.astype(np.float32).astype(np.float64)
            zhat = zhat + table64[_nearest_exact(target, zhat, table64)]
            sq_err[s] += float(np.sum((target - zhat) ** 2))
    train_mse = tuple(float(e / (n * z_dim)) for e in sq_err)
    return Codebook(centroids, train_mse, n, config.seed, source)


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[N, K] squared distances (expanded form; training only)."""
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :], 0.0)


def _kmeans(
    x: np.ndarray, k: int, iters: int, rng: np.random.Generator, pin_zero: bool
) -> np.ndarray:
    """Lloyd's k-means on x float64 [N, D] with k-means++ seeding; centroid 0 is held at
    the origin when ``pin_zero``. Returns float32 [K, D]."""
    n, _ = x.shape
    c = np.zeros((k, x.shape[1]))
    first = 1 if pin_zero else 0
    if not pin_zero:
        c[0] = x[rng.integers(n)]
    closest = _sq_dist(x, c[:1])[:, 0]
    for j in range(1, k):
        total = closest.sum()
        i = rng.integers(n) if total <= 0 else rng.choice(n, p=closest / total)
        c[j] = x[i]
        closest = np.minimum(closest, _sq_dist(x, c[j : j + 1])[:, 0])
    assign = None
    for _ in range(iters):
        dist = _sq_dist(x, c)
        new = np.argmin(dist, axis=1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(c)
        np.add.at(sums, assign, x)
        for j in range(first, k):
            if counts[j]:
                c[j] = sums[j] / counts[j]
            else:  # an empty cluster takes the point farthest from its centroid
                far = int(np.argmax(dist[np.arange(n), assign]))
                c[j] = x[far]
                dist[far, :] = 0.0
    return c.astype(np.float32)


# --------------------------------------------------------------------------- bitstream


def pack_codes(codes: np.ndarray, codebook: Codebook) -> bytes:
    """codes [B, G, S] -> B * `bytes_per_frame` bytes: per frame the G * S codes, groups
    outer and stages inner, each in ceil(log2 K) bits, most significant bit first, the
    frame padded with zero bits to whole bytes."""
    c = codebook.check_codes(codes)
    if c.shape[0] == 0:
        return b""
    bits = codebook.bits_per_code
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    per_frame = ((c.reshape(c.shape[0], -1)[:, :, None] >> shifts) & 1).reshape(c.shape[0], -1)
    pad = codebook.bytes_per_frame * 8 - per_frame.shape[1]
    per_frame = np.pad(per_frame, ((0, 0), (0, pad)))
    return np.packbits(per_frame.astype(np.uint8), axis=1).tobytes()


def unpack_codes(data: bytes, codebook: Codebook) -> np.ndarray:
    """Inverse of `pack_codes`: uint16 [B, G, S]."""
    per = codebook.bytes_per_frame
    if len(data) % per:
        raise AvatarqError(
            f"a code stream of this codebook is a multiple of {per} bytes per frame, got "
            f"{len(data)} bytes"
        )
    b = len(data) // per
    if b == 0:
        return np.zeros((0, codebook.groups, codebook.stages), np.uint16)
    raw = np.frombuffer(data, np.uint8).reshape(b, per)
    bits = np.unpackbits(raw, axis=1)[:, : codebook.bits_per_frame].astype(np.int64)
    width = codebook.bits_per_code
    weights = 1 << np.arange(width - 1, -1, -1, dtype=np.int64)
    values = (bits.reshape(b, -1, width) * weights).sum(axis=2)
    codes = values.reshape(b, codebook.groups, codebook.stages)
    codebook.check_codes(codes)
    return codes.astype(np.uint16)
