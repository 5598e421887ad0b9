"""Every avatarq command README.md and docs/cli.md show runs as printed.

The ```sh blocks of each file are played in order, each file in its own empty folder
(with the repository's examples/ beside them);
each `avatarq ...` line must exit 0. Other lines (make, comments) are not avatarq's.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from avatarq.cli import main

ROOT = Path(__file__).parent.parent
DOCUMENTS = ("README.md", "docs/cli.md")


def shown_commands(text: str) -> list[str]:
    """The `avatarq` command lines of the ```sh blocks (trailing comments dropped)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "avatarq":
                commands.append(shlex.join(words))
    return commands


def test_the_documents_show_the_commands_people_type():
    commands = [c for doc in DOCUMENTS for c in shown_commands((ROOT / doc).read_text())]
    verbs = {shlex.split(c)[1] for c in commands}
    assert {"synth", "info", "calibrate", "export", "build", "compare", "bench", "demo"} <= verbs


@pytest.mark.slow
def test_every_shown_command_runs_as_printed(tmp_path, monkeypatch, capsys):
    for doc in DOCUMENTS:
        folder = tmp_path / Path(doc).stem
        folder.mkdir()
        (folder / "examples").symlink_to(ROOT / "examples")  # the examples the docs run
        monkeypatch.chdir(folder)
        for command in shown_commands((ROOT / doc).read_text()):
            code = main(shlex.split(command)[1:])
            out, err = capsys.readouterr()
            assert code == 0, f"{doc}: `{command}` exited {code}: {err.strip()}"
