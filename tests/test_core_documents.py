"""Typed on-disk documents: strict validation, one-line errors, published schemas."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest

from avatarq.core.documents import (
    DOCUMENT_CONFIG,
    JsonFloat,
    dump_document,
    load_document,
    parse_document,
)
from avatarq.errors import AvatarqError
from avatarq.export.manifest import Manifest
from avatarq.export.options import ExportOptions
from avatarq.workflows.schemas import schema_texts


@dataclass
class Sample:
    __pydantic_config__ = DOCUMENT_CONFIG

    z_dim: int
    psnr: JsonFloat = 0.0


def test_infinite_floats_round_trip_as_strings():
    text = dump_document(Sample(3, math.inf))
    assert json.loads(text)["psnr"] == "Infinity"
    assert parse_document(text, Sample, "doc").psnr == math.inf


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"z_dim": "sixteen"}', r"doc is malformed: z_dim: input should be a valid integer"),
        ('{"z_dim": 1.5}', "z_dim: input should be a valid integer"),
        ('{"z_dim": true}', "z_dim: input should be a valid integer"),
        ('{"z_dim": 3, "extra": 1}', "extra: unknown field"),
        ("{}", "z_dim: field required"),
        ("[1]", r"\(top level\): input should be an object"),
        ("{not json", "doc is not valid JSON"),
        ("[" * 10000, "doc is not valid JSON"),
    ],
)
def test_bad_documents_are_one_line_errors(text, message):
    with pytest.raises(AvatarqError, match=message) as info:
        parse_document(text, Sample, "doc")
    assert "\n" not in str(info.value)


def test_post_init_checks_run_and_name_the_document():
    with pytest.raises(AvatarqError, match="options.json is malformed: max_batch must be"):
        parse_document('{"max_batch": 0}', ExportOptions, "options.json")


def test_a_missing_document_is_named(tmp_path):
    with pytest.raises(AvatarqError, match="manifest.json not found"):
        load_document(tmp_path / "manifest.json", Manifest, "manifest.json")


def test_export_options_reject_contradictions():
    with pytest.raises(AvatarqError, match="--int8 and --fp16 are exclusive"):
        ExportOptions(int8=True, fp16=True)
    with pytest.raises(AvatarqError, match=r"--calib\) needs --int8"):
        ExportOptions(calib="calib/")


def test_published_schemas_match_the_code():
    from pathlib import Path

    folder = Path(__file__).parent.parent / "docs" / "schemas"
    for name, text in schema_texts().items():
        assert (folder / name).read_text() == text, f"regenerate docs/schemas ({name})"
