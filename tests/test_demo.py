"""The demo's stage list end to end at minimum sizes (what `make demo` runs, only smaller)."""

import json

from mnet.demo import DemoSizes, demo_stages, run_demo


def test_demo_stages_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "demo"
    stages = demo_stages(out, DemoSizes.tiny())
    seen = []
    run_demo(out, stages, on_stage=lambda s, status, sec: seen.append((s.name, status)), stream_output=False)
    done = [n for n, st in seen if st == "done"]
    assert len(done) == len(stages) and all(d.startswith(s.name) for d, s in zip(done, stages))
    assert (out / "report" / "report.html").stat().st_size > 0
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert all(e["grade"] in "ABC" for e in events)
    assert json.loads((out / "search" / "arch.json").read_text())["search"]["latency_budget_ms"] > 0
    # a second run reuses every finished stage
    seen.clear()
    run_demo(out, demo_stages(out, DemoSizes.tiny()), on_stage=lambda s, status, sec: seen.append(status),
             stream_output=False)
    assert seen == ["reused"] * len(stages)
