"""``python -m bench.serving --sweep`` end to end on its quick random model: the engine runs, the
table, JSON and plot are written, and the prompts were pruned (fewer prompt tokens below 1.0)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sweep_writes_its_table_json_and_plot(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.serving", "--sweep", "--quick", "--ratios", "1.0,0.25",
                           "--concurrency", "1,2", "--sweep-requests", "1", "--output-tokens", "2",
                           "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"})  # bench/ from ROOT
    assert done.returncode == 0, done.stderr[-4000:]
    assert {"serving_sweep.json", "serving_sweep.md", "serving_sweep.png"} <= set(os.listdir(tmp_path))
    with open(tmp_path / "serving_sweep.json") as f:
        rows = json.load(f)["sweep"]
    assert sorted((r["concurrency"], r["keep_ratio"]) for r in rows) == [(1, 0.25), (1, 1.0), (2, 0.25), (2, 1.0)]
    prompt = {r["keep_ratio"]: r["prompt_tokens"] for r in rows}
    assert prompt[0.25] < prompt[1.0]
    assert all(r["requests"] == 8 and r["requests_per_s"] > 0 and r["ttft_ms_p50"] <= r["ttft_ms_p99"] for r in rows)
