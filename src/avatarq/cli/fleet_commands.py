"""``avatarq fleet``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from avatarq.cli.app import JsonOption, command, console, progress_bar
from avatarq.core.documents import document_dict


@command()
def fleet(
    manifest: Annotated[Path, typer.Argument(help="Fleet manifest (.json, or .toml).")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (default: <manifest stem>.out beside it)."),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Identities built at once on this machine.")
    ] = 1,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run on Ray instead: auto, HOST:PORT, ray://HOST:PORT, or local (start one "
            "here). Needs the fleet extra.",
        ),
    ] = None,
    threads: Annotated[
        int, typer.Option(min=0, help="torch threads per identity (0: cores / workers; Ray: 1).")
    ] = 0,
    as_json: JsonOption = False,
) -> None:
    """Calibrate, export and build every identity of a fleet manifest; resumable.

    Identities already built from the same checkpoint, data and options are skipped. Exit
    code 1 when an identity failed (the others still run), 2 for a bad manifest.

    Example: avatarq fleet fleet.json --out fleet.out --workers 2
    """
    from avatarq.workflows.fleet import run_fleet, summary_rows

    with progress_bar("fleet") as progress:
        summary = run_fleet(manifest, out, workers, ray, threads, progress)
    if as_json:
        console.print_json(json.dumps(document_dict(summary)))
        raise typer.Exit(summary.exit_code)
    rows = summary_rows(summary)
    width = max(8, *(len(row["identity"]) for row in rows))
    console.print(
        f"{'identity':<{width}}  {'status':<8} {'prec':<5} {'seconds':>8}  "
        f"{'validation':>10}  {'engine check':>12}  engine",
        highlight=False,
    )
    for row in rows:
        console.print(
            f"{row['identity']:<{width}}  {row['status']:<8} {row['precision']:<5} "
            f"{row['seconds']:>8}  {row['validation PSNR']:>10}  {row['engine PSNR']:>12}  "
            f"{row['engine']}",
            markup=False,
            highlight=False,
        )
    for row in rows:
        if row["error"]:
            console.print(
                f"failed  {row['identity']}: {row['error']}", markup=False, highlight=False
            )
    console.print(
        f"{summary.built} built, {summary.skipped} skipped, {summary.failed} failed "
        f"in {summary.seconds:.0f} s ({summary.executor}); index "
        f"{Path(summary.out) / 'index.html'}",
        markup=False,
        highlight=False,
    )
    raise typer.Exit(summary.exit_code)
