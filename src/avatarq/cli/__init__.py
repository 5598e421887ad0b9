"""The `avatarq` command line: thin commands that parse, call one library function, print.

Commands live in `model_commands` (info, synth), `quantize_commands` (calibrate, export),
`engine_commands` (build, compare), `bench_commands` (bench, demo), `stream_commands`
(vq, distill-warp) and `fleet_commands` (fleet); `app` holds the Typer app, error
handling, progress bars and the options commands share.
"""

# Importing a command module registers its commands, in the order `--help` lists them.
from avatarq.cli import model_commands  # noqa: I001
from avatarq.cli import quantize_commands
from avatarq.cli import engine_commands
from avatarq.cli import bench_commands
from avatarq.cli import stream_commands
from avatarq.cli import fleet_commands
from avatarq.cli.app import app, main

__all__ = [
    "app",
    "bench_commands",
    "engine_commands",
    "fleet_commands",
    "main",
    "model_commands",
    "quantize_commands",
    "stream_commands",
]
