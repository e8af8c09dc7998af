"""The one parameter table: the job schema, the command line's flags and README's table are built from it, so
each sees every parameter with the same name, default and range."""

from __future__ import annotations

from pathlib import Path

import pytest

from dia2_worker.generate import build_parser
from dia2_worker.jobs import JobInputError, WorkerLimits, parse_job
from dia2_worker.params import JOB_PARAMS, PARAMS, GenerationParams, readme_rows

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_every_job_parameter_as_the_table_says():
    lines = (ROOT / "README.md").read_text().splitlines()
    rows = readme_rows()
    start = lines.index(rows[0])
    assert lines[start: start + len(rows)] == rows


def test_the_command_line_has_a_flag_per_parameter_with_its_default():
    args = build_parser().parse_args(["--model-dir", "m", "--text", "hi", "--out", "o.wav"])
    assert GenerationParams(**{p.name: getattr(args, p.name) for p in PARAMS}) == GenerationParams()
    assert [p.flag for p in PARAMS] == ["--seed", "--temperature", "--top-k", "--text-temperature", "--text-top-k",
                                        "--cfg-scale", "--cfg-filter-k", "--initial-padding", "--max-frames"]


@pytest.mark.parametrize("param", JOB_PARAMS, ids=lambda p: p.job_field)
def test_a_job_may_ask_for_the_ends_of_each_range_and_nothing_beyond(param):
    limits = WorkerLimits()
    low = param.range.lo if not param.range.lo_open else param.range.lo + (1 if param.type is int else 0.5)
    for value in (low, param.range.hi):
        assert getattr(parse_job({"text": "[S1] hi", param.job_field: param.type(value)}, limits),
                       param.job_field) == value
    for value in (param.range.lo - 1, param.range.hi + 1):
        if param.type is int and abs(value) > 1 << 63:
            continue
        with pytest.raises(JobInputError) as info:
            parse_job({"text": "[S1] hi", param.job_field: param.type(value)}, limits)
        assert info.value.field == param.job_field
