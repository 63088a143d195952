"""tools/sweep.py: every variant trained under the budget and scored by test.py, a failed one reported without
stopping the others, the table written."""
from __future__ import annotations

import json
import sys

from conftest import SMALL_TRAIN, run


def test_a_sweep_trains_scores_and_reports_each_run(camvid, tmp_path):
    flags = " ".join(SMALL_TRAIN)
    result = run([sys.executable, "tools/sweep.py", "--budget", "90s", "--out", str(tmp_path), "--device", "cpu",
                  "--workers", "0", "--data-root", str(camvid),
                  f"plain={flags} --epochs 2 --schedule poly", f"broken={flags} --lr -1"], check=False)
    assert result.returncode == 1  # one run failed
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [row["name"] for row in rows] == ["plain", "broken"]
    plain, broken = rows
    assert plain["epochs"] == 2 and plain["completed"] and plain["label_size"] == [64, 96]
    assert 0 <= plain["val_miou"] <= 1 and "iou_Sky" in plain
    assert broken["train_exit"] == 2 and "val_miou" not in broken
    assert "--lr: expected a positive number" in (tmp_path / "broken" / "sweep.log").read_text()
    table = (tmp_path / "sweep.md").read_text()
    assert "| plain |" in table and "| broken |" in table and "failed" in table
