"""The Typer app, its error handling, progress bars and the options commands share.

Every user error (an `AvatarqError`, a Typer/click usage error) ends as one line on stderr
starting with ``error:`` and exit code 2; AVATARQ_DEBUG=1 shows the traceback instead.
SIGTERM is turned into SystemExit so staged outputs are cleaned up as on Ctrl-C.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

try:  # Typer 0.2x vendors click; errors are click's exception classes either way
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - a Typer that uses the click package
    from click import exceptions as click_errors

from avatarq import __version__
from avatarq.core.files import exit_on_sigterm
from avatarq.core.progress import silent
from avatarq.errors import AvatarqError

app = typer.Typer(
    name="avatarq",
    help="Deployment compiler for codec-avatar decoders: export, quantize (POCA), build, bench.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C")

# Options several commands share (one declaration each).
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ForceOption = Annotated[
    bool, typer.Option("--force", help="Replace an existing output that avatarq wrote.")
]
SeedOption = Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of every random draw.")]
DeviceOption = Annotated[str, typer.Option(help="Where runners run: auto, cpu or cuda.")]
ThreadsOption = Annotated[
    int, typer.Option(min=0, max=1024, help="ONNX Runtime threads (0: its default).")
]
BatchOption = Annotated[int, typer.Option(min=1, max=4096, help="Frames per decode call.")]
CameraOption = Annotated[
    int | None, typer.Option(min=0, help="Fold this camera's colour correction in.")
]
CaptureOption = Annotated[
    Path | None, typer.Option(help="Capture root: cameras, frames, normalization, topology.")
]
LatentsOption = Annotated[
    Path | None,
    typer.Option(help="Latent .npz (z, view, optional clips) to run on instead of the default."),
]
DataOption = Annotated[
    Path | None,
    typer.Option(
        help="Capture root or latent .npz to calibrate on (default: --capture, else data-free)."
    ),
]
CheckpointOption = Annotated[
    Path | None,
    typer.Option(help="The checkpoint the bundle came from (torch runner; encodes captures)."),
]
CheckpointArgument = Annotated[
    Path, typer.Option("--model", "-m", help="A Multiface-format DAM checkpoint (.pt).")
]
DecoderArgument = Annotated[
    Path,
    typer.Option(
        "--model",
        "-m",
        help="A Multiface-format DAM checkpoint (.pt), or your own decoder as "
        "path/to/file.py:factory (with --input and --texture-output).",
    ),
]
InputOption = Annotated[
    list[str] | None,
    typer.Option(
        "--input",
        help="A declared decoder's input NAME:SHAPE (z:256, code:4x8x8), once per input in "
        "forward's order; fed from the latent file's array of that name.",
    ),
]
TextureOutputOption = Annotated[
    str | None,
    typer.Option(help="A declared decoder's output the metrics judge (name or index)."),
]
MeshOutputOption = Annotated[
    str | None,
    typer.Option(help="A declared decoder's vertices output [B, V, 3] (name or index)."),
]


def config_from(ctx: typer.Context, kind: type[C], **overrides: Any) -> C:
    """Config dataclass ``kind`` from the command's options named like its fields;
    ``overrides`` give the fields whose options are renamed or parsed first."""
    from types import SimpleNamespace

    from avatarq.core.documents import shared_fields

    return shared_fields(SimpleNamespace(**ctx.params), kind, **overrides)


def declared_decoder(
    model: Path, inputs: list[str] | None, texture_output: str | None, mesh_output: str | None
) -> Any:
    """The `DeclaredDecoder` of ``--model file.py:factory`` with its declaration, or None
    for a checkpoint (which takes no declaration options)."""
    text = str(model)
    if ".py:" not in text and not text.endswith(".py"):
        given = [
            name
            for name, value in (
                ("--input", inputs),
                ("--texture-output", texture_output),
                ("--mesh-output", mesh_output),
            )
            if value
        ]
        if given:
            raise AvatarqError(
                f"{', '.join(given)} declare your own decoder: --model path/to/file.py:factory"
            )
        return None
    if not inputs:
        raise AvatarqError(
            f"--model {text} is your own decoder: declare its inputs with --input NAME:SHAPE"
        )
    if texture_output is None:
        raise AvatarqError(
            f"--model {text} is your own decoder: name the output the metrics judge with "
            "--texture-output NAME_OR_INDEX"
        )
    from avatarq.models.declaration import InputSpec, declare, load_factory

    specs = [InputSpec.parse(i) for i in inputs]  # bad declarations fail before the import
    return declare(load_factory(text), specs, texture_output, mesh_output)


def user_errors(fn: F) -> F:
    """Turn an AvatarqError into one line on stderr and exit code 2 (AVATARQ_DEBUG=1: raise)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AvatarqError as exc:
            if os.environ.get("AVATARQ_DEBUG"):
                raise
            print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def command(name: str | None = None) -> Callable[[F], F]:
    """Register the decorated function as the avatarq command ``name`` (default: the
    function's name, dashed), its user errors ending as one line (`user_errors`)."""

    def register(fn: F) -> F:
        return app.command(name)(user_errors(fn))

    return register


def print_error(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


class _Count(ProgressColumn):
    """``done/total`` for counted phases, nothing for phases of unknown length."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{int(task.completed)}/{int(task.total)}")


@contextmanager
def progress_bar(title: str) -> Iterator[Callable[..., None]]:
    """A transient progress bar on stderr; yields a `avatarq.core.progress.Progress`.

    Off when stderr is not a terminal (logs, pipes, tests): nothing is drawn there, and an
    error then stays the only line on stderr."""
    if not err_console.is_terminal:
        yield silent
        return
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        _Count(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    task = bar.add_task(title, total=None)

    def report(phase: str, done: int = 0, total: int | None = None) -> None:
        bar.update(task, description=phase, completed=done, total=total)

    bar.start()
    try:
        yield report
    finally:
        bar.stop()


def _version(value: bool) -> None:
    if value:
        console.print(f"avatarq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """avatarq: calibrate, export, build and benchmark codec-avatar decoders."""


def _usage_line(exc: click_errors.UsageError) -> str:
    message = " ".join(exc.format_message().split())
    command = exc.ctx.command_path if exc.ctx is not None else "avatarq"
    return f"{message} (see: {command} --help)"


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run a command, return its exit code."""
    exit_on_sigterm()
    try:
        code = app(args=argv, prog_name="avatarq", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        console.print(exc.ctx.get_help(), highlight=False, markup=False)
        code = 0
    except click_errors.UsageError as exc:
        print_error(_usage_line(exc))
        code = 2
    except click_errors.ClickException as exc:
        print_error(" ".join(exc.format_message().split()))
        code = exc.exit_code
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        print_error("interrupted")
        code = 130
    except AvatarqError as exc:  # raised outside a command body (e.g. in a callback)
        print_error(str(exc))
        code = 2
    except KeyboardInterrupt:
        print_error("interrupted")
        code = 130
    code = code if isinstance(code, int) else 0
    if argv is None:
        sys.exit(code)
    return code
