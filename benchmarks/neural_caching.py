"""Neural-Caching on the CPU: warp path against the full decoder, latency and quality.

The synthetic demo avatar (`avatarq.data.synthetic.make_synthetic_avatar` with its default
settings: texture 256, z 64, cached under --cache) is exported to an FP32 bundle; a warp
network is distilled on the capture's first segment through every camera and added to the
bundle; `avatarq.bench.caching.bench_caching` then plays the second segment (held out,
encoder mean, default camera) and reports the latency of the full decoder and of the warp
graph (ONNX Runtime, batch 1, round-robin in one run) and the texture PSNR / tDE of the
full, refresh and alternate streams against the FP32 decoder. With --docs the marked block
of docs/benchmarks.md is replaced.

    nice -n 10 python benchmarks/neural_caching.py --cache out/bench --docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path

from avatarq.bench.results import environment

BEGIN, END = "<!-- neural-caching:begin -->", "<!-- neural-caching:end -->"


def run(args: argparse.Namespace) -> dict:
    from avatarq.bench.caching import bench_caching
    from avatarq.bench.sequences import DEFAULT_CONE_DEG, BenchSequence, sequence_from_capture
    from avatarq.core.inputs import smooth_clip
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.synthetic import make_synthetic_avatar
    from avatarq.export import export_bundle
    from avatarq.export.bundle import open_bundle
    from avatarq.export.caching import attach_caching, decoder_of_bundle
    from avatarq.models.caching import CacheNetwork, WarpConfig, count_macs
    from avatarq.models.checkpoint import load_checkpoint
    from avatarq.workflows.caching import (
        DistillConfig,
        capture_clips,
        distill_warp,
        weights_sha256,
    )

    def say(phase: str, done: int = 0, total: int | None = None) -> None:
        if total is None or done in (1, total) or done % 200 == 0:
            print(f"  {phase} {done}/{total or ''}", file=sys.stderr, flush=True)

    avatar = make_synthetic_avatar(args.cache / "synth_demo", progress=say)
    work = args.cache / "neural_caching"
    work.mkdir(parents=True, exist_ok=True)
    bundle = work / "dam_fp32.avq"
    record_path = work / "distill.json"
    if args.reuse and record_path.is_file() and bundle.is_dir():
        saved = json.loads(record_path.read_text())
        opened = open_bundle(bundle)
        decoder = decoder_of_bundle(opened, avatar.checkpoint)
        warp_config = WarpConfig.from_dict(saved["warp_config"])
        cache = CacheNetwork(decoder, warp_config.resolved_blocks(decoder.config.n_tex_blocks))
        import torch

        from avatarq.workflows.caching import WarpFile

        state = torch.load(work / "warp_state.pt", weights_only=True)
        _, warp = WarpFile(warp_config, state, saved["dam_config"], "0" * 64, {}).build(decoder)
        capture = MultifaceCapture(avatar.capture_root)
        clips = capture_clips(load_checkpoint(avatar.checkpoint), avatar.capture_root)
        z_mean, z_std = clips.z.mean(0), clips.z.std(0)
        test_segment = capture.segments[1]
        report_dict, meta = saved["distill"], saved["meta"]
    else:
        export_bundle(avatar.checkpoint, bundle, avatar.capture_root, force=True)
        opened = open_bundle(bundle)
        decoder = decoder_of_bundle(opened, avatar.checkpoint)
        model = load_checkpoint(avatar.checkpoint)
        capture = MultifaceCapture(avatar.capture_root)
        train_segment, test_segment = capture.segments[0], capture.segments[1]
        clips = capture_clips(model, avatar.capture_root)
        keep = [i for i, label in enumerate(clips.ids) if label[0] == train_segment]
        train = clips.subset(keep)
        n_camera_clips = len(train.clips)
        # The demo avatar's encoder codes move little within a segment, so the warp
        # network also learns from, and is benched on, smooth clips over the capture's
        # latent distribution (seeded; the bench clip's seed is not a training seed).
        z_mean, z_std = clips.z.mean(0), clips.z.std(0)
        synthetic = [
            smooth_clip(len(z_mean), 32, seed, z_mean, z_std, cone_deg=DEFAULT_CONE_DEG)
            for seed in range(100, 100 + args.train_clips)
        ]
        train = concat_inputs([train, *synthetic])
        warp_config = WarpConfig(width=args.width, up_stages=args.up_stages)
        config = DistillConfig(steps=args.steps, batch=args.batch, max_gap=max(1, args.refresh - 1))
        warp, report = distill_warp(decoder, train, warp_config, config, say)
        cache = CacheNetwork(decoder, warp_config.resolved_blocks(decoder.config.n_tex_blocks))
        attach_caching(
            bundle,
            cache,
            warp,
            weights_sha256(warp),
            {"final_loss": report.final_loss, "identity_loss": report.identity_loss},
            args.refresh,
            force=True,
        )
        report_dict = report.to_dict()
        meta = {
            "train_segment": train_segment,
            "n_train_clips": n_camera_clips,
            "train_clips": args.train_clips,
            "steps": args.steps,
            "batch": args.batch,
        }
        from dataclasses import asdict

        import torch

        torch.save(
            {n: p.detach() for n, p in warp.named_parameters() if p.requires_grad},
            work / "warp_state.pt",
        )
        record_path.write_text(
            json.dumps(
                {
                    "warp_config": warp_config.to_dict(),
                    "dam_config": asdict(decoder.config),
                    "distill": report_dict,
                    "meta": meta,
                }
            )
        )
    held_out = sequence_from_capture(capture, test_segment, avatar.checkpoint)
    clip = BenchSequence(smooth_clip(len(z_mean), 32, 0, z_mean, z_std, cone_deg=DEFAULT_CONE_DEG))
    results = {
        "capture": bench_caching(bundle, held_out, args.refresh, 5, args.iters, args.threads),
        "clip": bench_caching(bundle, clip, args.refresh, 5, args.iters, args.threads),
    }
    macs = count_macs(cache, warp)
    return {
        "results": {k: v.to_dict() for k, v in results.items()},
        "distill": report_dict,
        **meta,
        "test_segment": test_segment,
        "macs": macs,
        "warp_config": warp_config.to_dict(),
        "threads": args.threads,
        "model": avatar.record.model,
    }


def concat_inputs(parts: list) -> object:
    """One `DecoderInputs` holding every part's z, view and clips."""
    import numpy as np

    from avatarq.core.inputs import DecoderInputs

    clips, start = [], 0
    for part in parts:
        clips += [tuple(start + i for i in c) for c in part.clips]
        start += len(part)
    return DecoderInputs.from_z_view(
        np.concatenate([p.z for p in parts]),
        np.concatenate([p.view for p in parts]),
        clips=tuple(clips),
        source="distillation clips",
    )


def _quality_rows(r: dict) -> list[str]:
    names = {
        "full": "full decoder every frame",
        "refresh": f"refresh every {r['refresh_every']} (warp in between)",
        "hold": f"refresh every {r['refresh_every']}, cached frame held in between (baseline)",
        "alternate": "alternate (every frame warped from the previous frame's cache)",
        "previous": "previous frame's full decode shown unchanged (baseline of alternate)",
    }
    rows = []
    for key, label in names.items():
        q = r["quality"][key]
        rows.append(
            f"| {label} | {float(q['psnr_all_db']):.2f} | {float(q['psnr_min_db']):.2f} | "
            f"{float(q['tde']):.3g} | {float(q['jitter_ratio']):.3f} |"
        )
    return rows


def markdown(record: dict, command: str) -> str:
    res, d, m = record["results"], record["distill"], record["model"]
    r = res["clip"]
    env = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    full, warp = r["latency"]["full"], r["latency"]["warp"]
    macs = record["macs"]
    rows = [
        "| path | latency min (ms) | p50 (ms) | mean (ms) | multiply-adds per frame |",
        "|---|---|---|---|---|",
        f"| full decoder (cache graph) | {full['min_ms']:.3f} | {full['p50_ms']:.3f} | "
        f"{full['mean_ms']:.3f} | {macs['full'] / 1e6:.1f} M |",
        f"| warp graph | {warp['min_ms']:.3f} | {warp['p50_ms']:.3f} | {warp['mean_ms']:.3f} | "
        f"{macs['warp'] / 1e6:.1f} M |",
        f"| refresh every {r['refresh_every']} (mean per frame) | | | "
        f"{r['refresh_mean_ms']:.3f} | |",
    ]
    header = [
        "| stream vs FP32 decoder | texture PSNR, all frames (dB) | worst frame (dB) | tDE | J |",
        "|---|---|---|---|---|",
    ]
    seq = res["capture"]["sequence"]
    return "\n".join(
        [
            f"Synthetic demo avatar (DAM `{m['arch']}`, z {m['z_dim']}, texture {m['tex_size']}, "
            f"{m['n_vertices']} vertices), FP32 bundle with the capture's normalization. Warp "
            f"network (width {record['warp_config']['width']}, {record['warp_config']['up_stages']} "
            f"up-stage, cache at T/4) distilled for {record['steps']} steps of batch "
            f"{record['batch']} on segment `{record['train_segment']}` through "
            f"{record['n_train_clips']} cameras and {record['train_clips']} smooth latent clips "
            f"({d['seconds'] / 60:.1f} min; final texture "
            f"MSE {d['final_loss']:.3g} normalized units, the cached frame as is "
            f"{d['identity_loss']:.3g}). Latency: ONNX Runtime on the CPU, "
            f"{record['threads']} thread, batch 1, {full['n']} timed calls of each graph, "
            "round-robin, during the clip's bench.",
            "",
            *rows,
            "",
            "Smooth latent clip over the capture's latent distribution (32 frames, seed 0, "
            "views within 25 deg of the front; not a training clip); consecutive FP32 frames "
            f"differ by {float(r['motion_psnr_db']):.1f} dB PSNR:",
            "",
            *header,
            *_quality_rows(r),
            "",
            f"Held-out capture segment ({seq}); consecutive FP32 frames differ by "
            f"{float(res['capture']['motion_psnr_db']):.1f} dB PSNR:",
            "",
            *header,
            *_quality_rows(res["capture"]),
            "",
            f"Measured {datetime.date.today().isoformat()} on {env['cpu']} ({env['cpu_count']} "
            f"CPUs, shared with other jobs; {platform.system()}); {versions}. Command: "
            f"`{command}`.",
        ]
    )


def _replace_block(docs: Path, body: str) -> None:
    block = f"{BEGIN}\n{body}\n{END}"
    text = docs.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{docs} has no {BEGIN} block")
    docs.write_text(pattern.sub(lambda _m: block, text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("out/bench"), help="cache folder")
    parser.add_argument("--docs", type=Path, default=None, help="markdown file to update")
    parser.add_argument("--steps", type=int, default=800, help="distillation steps")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--refresh", type=int, default=4, help="cache period N")
    parser.add_argument("--width", type=int, default=8, help="warp network width")
    parser.add_argument("--up-stages", type=int, default=1, help="warp up-stages")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per graph")
    parser.add_argument("--train-clips", type=int, default=16, help="smooth training clips")
    parser.add_argument(
        "--reuse", action="store_true", help="bench the warp network distilled by a previous run"
    )
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    args = parser.parse_args(argv)
    command = "python benchmarks/neural_caching.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    record = run(args)
    print(json.dumps(record, indent=2))
    body = markdown(record, command)
    print(body)
    if args.docs is not None:
        _replace_block(args.docs, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
