"""`avatarq fleet`: calibrate -> export -> build for many identities, resumable, locally or on Ray.

A telepresence service holds one decoder per identity. `run_fleet` reads a fleet manifest
(`avatarq.workflows.fleet_manifest`: identities, each a checkpoint plus a capture or latents
plus options), validates all of it before any work, then runs one task per identity
(`avatarq.workflows.fleet_identity.process_identity`) on a process pool on this machine or on
a Ray cluster (`avatarq.workflows.fleet_executors`). Each identity lands in ``OUT/<name>/``;
one that was already built from the same inputs (same hash) is skipped; one that fails is
reported with its one-line error while the others go on. At the end it writes, atomically:

    OUT/fleet-summary.json   `FleetSummary`: every identity's `IdentityResult`, in manifest order
    OUT/index.md             a table linking each identity's bundle, engine and record
    OUT/index.html           the same table as a page

    from avatarq.workflows.fleet import run_fleet
    summary = run_fleet("fleet.json", "fleet.out", workers=2)
    summary.failed  # 0 when every identity was built or skipped
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from avatarq.core.documents import DOCUMENT_CONFIG, dump_document, load_document
from avatarq.core.files import atomic_write_text
from avatarq.core.progress import Progress, or_silent
from avatarq.errors import AvatarqError
from avatarq.workflows.fleet_executors import (
    default_threads,
    import_ray,
    run_in_pool,
    run_on_ray,
)
from avatarq.workflows.fleet_identity import RECORD_FILE, IdentityResult
from avatarq.workflows.fleet_manifest import (
    INDEX_HTML,
    INDEX_MD,
    SUMMARY_FILE,
    FleetPlan,
    load_fleet,
)

SUMMARY_VERSION = 1
COLUMNS = (
    "identity",
    "status",
    "precision",
    "calibrate s",
    "export s",
    "build s",
    "seconds",
    "validation PSNR",
    "engine PSNR",
    "engine",
    "error",
)

__all__ = [
    "FleetSummary",
    "IdentityResult",
    "default_out",
    "load_fleet",
    "run_fleet",
    "summary_rows",
]


@dataclass
class FleetSummary:
    """One fleet run: what ran where, and every identity's result in manifest order.

    Attributes:
        manifest: the fleet manifest's path.
        out: the output folder.
        executor: "process pool, N workers" or "ray ADDRESS".
        seconds: wall seconds of the whole run.
        built, skipped, failed: how many identities ended so.
        identities: the results, in manifest order.
        version: summary schema version.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    manifest: str
    out: str
    executor: str
    seconds: float
    built: int
    skipped: int
    failed: int
    identities: list[IdentityResult] = field(default_factory=list)
    version: int = SUMMARY_VERSION

    @property
    def exit_code(self) -> int:
        """0 when every identity was built or skipped, 1 when one failed."""
        return 1 if self.failed else 0


def default_out(manifest: str | Path) -> Path:
    """Where a fleet writes when no output folder is given: ``<manifest stem>.out`` beside it."""
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.out")


def _check_out(out: Path) -> None:
    """Refuse an output folder whose summary files avatarq fleet did not write."""
    if out.exists() and not out.is_dir():
        raise AvatarqError(f"--out {out} exists and is not a folder")
    summary = out / SUMMARY_FILE
    if summary.exists():
        load_document(summary, FleetSummary, f"{summary} (not written by avatarq fleet?)")
        return
    for name in (INDEX_MD, INDEX_HTML):
        if (out / name).exists():
            raise AvatarqError(
                f"{out / name} exists but {SUMMARY_FILE} does not; it was not written by "
                "avatarq fleet, so choose another --out"
            )


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.1f} dB"


def _s(value: float) -> str:
    return f"{value:.1f}" if value else "-"


def summary_rows(summary: FleetSummary) -> list[dict[str, str]]:
    """One row per identity, keyed by `COLUMNS`, as the CLI and the index show them."""
    rows = []
    for r in summary.identities:
        rows.append(
            {
                "identity": r.name,
                "status": r.status,
                "precision": r.precision,
                "calibrate s": _s(r.seconds.calibrate),
                "export s": _s(r.seconds.export),
                "build s": _s(r.seconds.build),
                "seconds": f"{r.seconds.total:.1f}",
                "validation PSNR": _db(r.validation_psnr_db),
                "engine PSNR": _db(r.engine_psnr_db),
                "engine": r.backend or "-",
                "error": r.error or "",
            }
        )
    return rows


def _links(r: IdentityResult) -> list[tuple[str, str]]:
    links = []
    if r.bundle is not None:
        links.append(("bundle", f"{r.bundle}/manifest.json"))
    if r.engine is not None:
        links.append(("engine", r.engine))
    if r.status != "failed" or r.inputs is not None:
        links.append(("record", f"{r.name}/{RECORD_FILE}"))
    return links


def _title(summary: FleetSummary) -> str:
    return (
        f"{len(summary.identities)} identities: {summary.built} built, {summary.skipped} "
        f"skipped, {summary.failed} failed ({summary.executor}, {summary.seconds:.0f} s)"
    )


def index_markdown(summary: FleetSummary) -> str:
    """The report index as GitHub markdown: a title line and one table row per identity."""
    header = [*COLUMNS, "files"]
    lines = [
        f"# avatarq fleet: {Path(summary.manifest).name}",
        "",
        _title(summary),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r, row in zip(summary.identities, summary_rows(summary), strict=True):
        files = ", ".join(f"[{label}]({target})" for label, target in _links(r))
        cells = [row[c].replace("|", "\\|") for c in COLUMNS] + [files]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def index_html(summary: FleetSummary) -> str:
    """The report index as a standalone HTML page (the same table as `index_markdown`)."""
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in (*COLUMNS, "files"))
    body = []
    for r, row in zip(summary.identities, summary_rows(summary), strict=True):
        cells = "".join(f"<td>{e(row[c])}</td>" for c in COLUMNS)
        files = ", ".join(f'<a href="{e(t)}">{e(label)}</a>' for label, t in _links(r))
        body.append(f'<tr class="{e(r.status)}">{cells}<td>{files}</td></tr>')
    title = f"avatarq fleet: {Path(summary.manifest).name}"
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f"<title>{e(title)}</title><style>"
        "body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "tr.failed{background:#fdd}tr.skipped{color:#666}</style></head><body>\n"
        f"<h1>{e(title)}</h1>\n<p>{e(_title(summary))}</p>\n"
        f"<table>\n<tr>{head}</tr>\n" + "\n".join(body) + "\n</table>\n</body></html>\n"
    )


def write_report(summary: FleetSummary, out: Path) -> dict[str, Path]:
    """Write the summary JSON and both indexes into ``out`` (each atomically)."""
    paths = {"summary": out / SUMMARY_FILE, "markdown": out / INDEX_MD, "html": out / INDEX_HTML}
    atomic_write_text(paths["markdown"], index_markdown(summary))
    atomic_write_text(paths["html"], index_html(summary))
    atomic_write_text(paths["summary"], dump_document(summary))
    return paths


def run_fleet(
    manifest: str | Path,
    out: str | Path | None = None,
    workers: int = 1,
    ray_address: str | None = None,
    threads: int = 0,
    progress: Progress | None = None,
) -> FleetSummary:
    """Build every identity of the fleet ``manifest`` into ``out`` (default: `default_out`).

    Args:
        manifest: a fleet manifest (`avatarq.workflows.fleet_manifest`), JSON or TOML.
        out: output folder; ``out/<name>/`` per identity plus the summary and indexes.
        workers: identities built at once by the local process pool (ignored with Ray).
        ray_address: run on Ray instead: ``auto``, ``HOST:PORT``, ``ray://HOST:PORT`` or
            ``local`` (see `run_on_ray`).
        threads: torch threads per identity (0: this machine's cores / workers locally,
            1 on Ray); on Ray each task also reserves that many CPUs.
        progress: told ``("<name> <status>", done, total)`` as each identity finishes.

    Returns:
        The `FleetSummary` (also written to ``out``); ``exit_code`` is 1 when one failed.

    Raises:
        AvatarqError: a bad manifest, output folder or option, before any identity runs.
    """
    plan: FleetPlan = load_fleet(manifest)
    out = Path(out) if out is not None else default_out(manifest)
    _check_out(out)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise AvatarqError(f"--threads must be an integer >= 0, got {threads!r}")
    total = len(plan.identities)
    done: list[IdentityResult] = []
    say = or_silent(progress)
    say(f"fleet of {total} identities", 0, total)

    def collect(result: IdentityResult) -> None:
        done.append(result)
        say(f"{result.name} {result.status}", len(done), total)

    start = time.perf_counter()
    if ray_address is not None:
        import_ray()  # a missing Ray is a one-line error before anything is written
        executor = f"ray {ray_address}"
        tasks = plan.tasks(out, threads or 1)
        out.mkdir(parents=True, exist_ok=True)
        run_on_ray(tasks, ray_address, collect, cpus_per_task=threads or 1)
    else:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise AvatarqError(f"--workers must be an integer >= 1, got {workers!r}")
        executor = f"process pool, {workers} worker{'s' if workers > 1 else ''}"
        tasks = plan.tasks(out, threads or default_threads(min(workers, total)))
        out.mkdir(parents=True, exist_ok=True)
        run_in_pool(tasks, workers, collect)
    by_name = {r.name: r for r in done}
    ordered = [by_name[e.name] for e in plan.identities]
    statuses = [r.status for r in ordered]
    summary = FleetSummary(
        manifest=str(plan.manifest),
        out=str(out.resolve()),
        executor=executor,
        seconds=round(time.perf_counter() - start, 3),
        built=statuses.count("built"),
        skipped=statuses.count("skipped"),
        failed=statuses.count("failed"),
        identities=ordered,
    )
    write_report(summary, out)
    return summary
