"""The figures of the bench report: PSNR and tDE per frame, the latency histogram, and
per runner a strip FP32 | deployed | amplified error of its worst frames (PNG bytes).

Drawn with matplotlib's Agg canvas directly (`matplotlib.figure.Figure`), so the global
pyplot backend of the calling process is left alone.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from avatarq.bench.results import BenchResult, FrameStrip

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")
_REF_COLOR = "#7f7f7f"


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def compared_spaces(result: BenchResult) -> list[str]:
    spaces = ["texture"]
    if any(r.screen is not None for r in result.runners):
        spaces.append("screen")
    return spaces


def _finite_or_nan(values: np.ndarray) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64).copy()
    out[~np.isfinite(out)] = np.nan
    return out


def psnr_figure(result: BenchResult) -> bytes:
    """PSNR per frame, one panel per space (texture, screen), one line per runner."""
    spaces = compared_spaces(result)
    fig = _figure(5.2 * len(spaces), 3.2)
    axes = fig.subplots(1, len(spaces), squeeze=False)[0]
    for ax, space in zip(axes, spaces, strict=True):
        notes = []
        for i, r in enumerate(result.runners):
            comp = r.texture if space == "texture" else r.screen
            if comp is None:
                continue
            values = np.asarray(comp.psnr_per_frame, dtype=np.float64)
            frames = np.arange(values.size)
            if np.isposinf(values).all():
                notes.append(f"{r.name}: identical to FP32 (PSNR = inf)")
                continue
            _frame_line(ax, frames, _finite_or_nan(values), i, r.name)
            if np.isposinf(values).any():
                notes.append(f"{r.name}: some frames identical (inf, not drawn)")
        _finish_frame_panel(ax, result, "psnr", notes, -0.5)
        ax.set_title(f"PSNR per frame, {space} space")
        ax.set_xlabel("frame")
        ax.set_ylabel("PSNR vs FP32 (dB)")
    return _png(fig)


def _frame_line(ax: Any, x: np.ndarray, y: np.ndarray, i: int, label: str) -> None:
    """Runner ``i``'s per-frame values, dots joined."""
    ax.plot(x, y, marker="o", ms=3, lw=1.4, color=_color(i), label=label)


def _finish_frame_panel(
    ax: Any, result: BenchResult, metric: str, notes: list[str], first: float
) -> None:
    """Gate lines of ``metric``, legend-only ``notes``, frames from ``first`` to the last,
    integer ticks, grid and a legend when anything is labelled."""
    for g in _gates_on(result, metric):
        ax.axhline(g.threshold, color="k", ls="--", lw=0.8, label=f"gate {g.op}{g.threshold:g}")
    for note in notes:
        ax.plot([], [], " ", label=note)
    ax.set_xlim(first, result.sequence["n_frames"] - 0.5)
    _integer_x(ax)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def tde_figure(result: BenchResult) -> bytes:
    """tDE per consecutive frame pair, one panel per space, one line per runner."""
    spaces = compared_spaces(result)
    fig = _figure(5.2 * len(spaces), 3.2)
    axes = fig.subplots(1, len(spaces), squeeze=False)[0]
    for ax, space in zip(axes, spaces, strict=True):
        for i, r in enumerate(result.runners):
            comp = r.texture if space == "texture" else r.screen
            if comp is None:
                continue
            values = np.asarray(comp.tde_per_frame, dtype=np.float64)
            label = f"{r.name} (J = {comp.jitter_ratio:.3g})"
            _frame_line(ax, np.arange(1, values.size + 1), values, i, label)
        _finish_frame_panel(ax, result, "tde", [], 0.5)
        ax.set_title(f"tDE per frame, {space} space")
        ax.set_xlabel("frame t (pair t-1, t)")
        ax.set_ylabel("mean |e_t - e_(t-1)|")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _png(fig)


def latency_figure(result: BenchResult) -> bytes:
    """Histograms of per-iteration latency: decode (left) and end to end (right), the
    reference in grey and each runner in colour, medians dashed."""
    stages = [s for s in ("decode", "end_to_end") if s in result.reference.latency]
    if "end_to_end" in stages and "render" not in result.reference.latency:
        stages = ["decode"]  # without rendering end_to_end == decode
    fig = _figure(5.2 * len(stages), 3.2)
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    entries = [(result.reference, _REF_COLOR, "FP32 reference")] + [
        (r, _color(i), r.name) for i, r in enumerate(result.runners)
    ]
    for ax, stage in zip(axes, stages, strict=True):
        all_ms = np.concatenate(
            [np.asarray(r.latency[stage].samples_ms) for r, _, _ in entries if stage in r.latency]
        )
        lo, hi = float(all_ms.min()), float(all_ms.max())
        log = lo > 0 and hi / lo > 20
        bins = (
            np.geomspace(lo, hi, 40) if log else np.linspace(lo, hi if hi > lo else lo + 1e-3, 40)
        )
        for r, color, label in entries:
            if stage not in r.latency:
                continue
            stats = r.latency[stage]
            ax.hist(
                stats.samples_ms,
                bins=bins,
                histtype="stepfilled",
                alpha=0.35,
                color=color,
                edgecolor=color,
                lw=1.2,
                label=f"{label}: p50 {stats.p50_ms:.3g} ms, p99 {stats.p99_ms:.3g} ms",
            )
            ax.axvline(stats.p50_ms, color=color, ls="--", lw=1)
        for g in _gates_on(result, "p99_ms") if stage == result.config.gate_stage else []:
            label = f"gate p99 {g.op}{g.threshold:g} ms"
            if lo / 3 <= g.threshold <= hi * 3:
                ax.axvline(g.threshold, color="k", ls=":", lw=1, label=label)
            else:  # far off the data: say so rather than squash the histogram
                ax.plot([], [], " ", label=f"{label} (off scale)")
        if log:
            ax.set_xscale("log")
        ax.set_title(
            f"latency per iteration, {stage.replace('_', ' ')} (batch {result.config.batch})"
        )
        ax.set_xlabel("milliseconds")
        ax.set_ylabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def _error_map(strip: FrameStrip) -> tuple[np.ndarray, float]:
    """(|Q - F| averaged over channels [H, W] times a gain, the gain): the gain maps the
    99.5th percentile of the error (inside the mask) to 1, so the pattern is visible
    whatever its size."""
    err = np.abs(strip.deployed.astype(np.float64) - strip.reference).mean(axis=-1)
    inside = err[strip.mask > 0] if strip.mask is not None else err.ravel()
    peak = float(np.percentile(inside, 99.5)) if inside.size else 0.0
    if peak <= 0.0:
        peak = float(inside.max()) if inside.size else 0.0
    gain = 1.0 / peak if peak > 0 else 1.0
    return np.clip(err * gain, 0.0, 1.0), gain


def strip_figure(name: str, strips: Sequence[FrameStrip]) -> bytes:
    """One row per space: FP32 | deployed | amplified |error| of the worst frame."""
    fig = _figure(9.0, 3.1 * len(strips))
    axes = fig.subplots(len(strips), 3, squeeze=False)
    for row, strip in zip(axes, strips, strict=True):
        err, gain = _error_map(strip)
        psnr_txt = "inf" if math.isinf(strip.psnr) else f"{strip.psnr:.2f}"
        row[0].imshow(np.clip(strip.reference, 0, 1), interpolation="nearest")
        row[0].set_title(f"FP32, {strip.space} (frame {strip.frame})", fontsize=9)
        row[1].imshow(np.clip(strip.deployed, 0, 1), interpolation="nearest")
        row[1].set_title(f"{name}: PSNR {psnr_txt} dB", fontsize=9)
        identical = not np.any(strip.deployed != strip.reference)
        row[2].imshow(err, cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
        row[2].set_title("|error|: identical" if identical else f"|error| x {gain:.3g}", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(strip.frame_id, fontsize=7)
    return _png(fig)


def _gates_on(result: BenchResult, metric: str) -> list[Any]:
    return [g for g in result.config.parsed_gates() if g.metric == metric]


def figures(result: BenchResult) -> dict[str, bytes]:
    """Every figure of the page as PNG bytes, by name (``psnr``, ``tde``, ``latency``,
    ``strip_<runner>``)."""
    out = {
        "psnr": psnr_figure(result),
        "tde": tde_figure(result),
        "latency": latency_figure(result),
    }
    for name, strips in result.strips.items():
        if strips:
            out[f"strip_{name}"] = strip_figure(name, strips)
    return out


# --------------------------------------------------------------------------- html
