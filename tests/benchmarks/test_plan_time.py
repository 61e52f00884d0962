"""benchmarks/plan_time.py --smoke: the planner's timing record has every run, first apart."""
import json
from scripts import load_script

def test_smoke_record(tmp_path):
    bench = load_script("benchmarks/plan_time.py")
    record = bench.main(["--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "plan_time_smoke.json").read_text()) == json.loads(json.dumps(record))
    (r,) = record["results"]
    assert len(r["seconds"]) == 2 and r["first_s"] == r["seconds"][0] and r["median_later_s"] == r["seconds"][1]
    assert 0 < r["kept_dims_share"] <= 1 and {"torch", "timm"} <= set(record["versions"])
