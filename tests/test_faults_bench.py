"""The fault bench's fast cases (bench/faults.py, issue 14) on the export tests' bundle and a short conveyor clip:
a backend that raises every Nth call, one that returns NaN, and a sink on a full disk each cost no fruit and
duplicate none, with the exit code the CLI promises and no secret in any output."""

from __future__ import annotations

import os

import pytest
from test_export_support import exported_bundle

import faults  # bench/ (on the path from conftest)


@pytest.fixture(scope="module")
def env(colour_data, tmp_path_factory):
    bundle = exported_bundle(colour_data, tmp_path_factory)  # shared with the export tests
    return faults.make_env(tmp_path_factory.mktemp("faults"), bundle, fruits=4, size_wh=(320, 240))


def _check(row: dict, exit_code: int = 0) -> None:
    assert (row["fruit"], row["events"], row["lost"], row["duplicates"]) == (4, 4, 0, 0), row
    assert row["exit_code"] == exit_code and not row["secret_seen"] and row["ok"], row


def test_baseline_grades_every_fruit_of_the_clip(env):
    _check(faults.case_baseline(env))


def test_backend_raising_every_third_call_costs_no_fruit(env):
    row = faults.case_backend_raise(env, every=3)
    _check(row)
    assert row["infer_errors"] > 0  # the fault fired, and the retry absorbed it


def test_nan_output_every_fourth_call_costs_no_fruit(env):
    row = faults.case_nan_output(env, every=4)
    _check(row)
    assert row["nonfinite_outputs"] > 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_jsonl_on_a_full_disk_leaves_the_csv_complete_and_exits_2(env):
    row = faults.case_full_disk_sink(env)
    _check(row, exit_code=2)
    assert row["csv_rows"] == 4 and row["error_lines"] == 1 and "/dev/full" in row["error"]
