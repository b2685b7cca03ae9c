"""What a run reports: read from the kit's own files, never recomputed.

The score is the kit's scores.txt (ALC = `score`, `Duration`, one NAUC per scored prediction); the
status comes from ingestion's start.txt / end.txt and scoring's log. The last stdout line
`ALC=.. NAUC=.. n_predictions=.. duration=..` (NAUC of the last prediction) is what the project's
tools parse; OUT/summary.json holds the rest.
"""
from __future__ import annotations

import os
import re
import signal

_FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf"


def parse_scores(path: str) -> dict:
    """scores.txt as numbers: `score` and `Duration` (floats, nan when empty), `timestamps`, `nauc_scores`
    and `accuracy` (lists)."""
    res = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            # NumPy >= 2 prints list items as np.float64(x): unwrap them first.
            value = re.sub(r"np\.\w+\(([^()]*)\)", r"\1", value)
            nums = [float(x) for x in re.findall(_FLOAT, value)]
            if key in ("score", "Duration"):
                res[key] = nums[0] if nums else float("nan")
            elif key in ("timestamps", "nauc_scores", "accuracy"):
                res[key] = nums
    return res


def read_key_values(path: str) -> dict:
    """The `key: value` lines of ingestion's start.txt / end.txt ({} when the file is absent)."""
    out = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k.strip()] = v.strip()
    return out


def count_predictions(pred_dir: str, task: str) -> int:
    """How many prediction files ingestion has written (`<task>.predict_<i>`)."""
    return len([f for f in os.listdir(pred_dir) if f.startswith(task + ".predict_")])


def run_status(end_info: dict, start_info: dict, scoring_log: str, ingestion_rc: int | None) -> str:
    """ok / ingestion_error (end.txt says so), time_budget_exceeded (scoring stopped ingestion at the
    budget, or ingestion was terminated after it started), else ingestion_died."""
    if end_info:
        return "ok" if end_info.get("ingestion_success") == "1" else "ingestion_error"
    if "Detected time budget is used up" in scoring_log or (ingestion_rc == -signal.SIGTERM and start_info):
        return "time_budget_exceeded"
    return "ingestion_died"


def add_scores(summary: dict, scores_txt: str) -> bool:
    """Put the kit's scores into `summary` (zeros when scores.txt is absent); True when there was one."""
    if os.path.isfile(scores_txt):
        s = parse_scores(scores_txt)
        nauc = s.get("nauc_scores", [])
        summary.update({
            "alc": s.get("score"), "duration": s.get("Duration"),
            "nauc_scores": nauc, "timestamps": s.get("timestamps", []),
            "accuracy": s.get("accuracy"),
            "nauc_last": nauc[-1] if nauc else None,
            "n_predictions": len(nauc),
        })
        return True
    summary.update({"alc": 0.0, "duration": 0.0, "nauc_scores": [], "timestamps": [], "nauc_last": 0.0,
                    "n_predictions": 0})
    return False


def exit_status(summary: dict) -> int:
    """0 when at least one prediction was scored, 3 when none."""
    return 0 if summary["n_predictions"] else 3


def score_line(summary: dict) -> str:
    """The last stdout line: `ALC=<float> NAUC=<float> n_predictions=<int> duration=<s>`."""
    return "ALC=%.6f NAUC=%.6f n_predictions=%d duration=%.2f" % (
        summary["alc"], summary["nauc_last"] if summary["nauc_last"] is not None else 0.0,
        summary["n_predictions"], summary["duration"] or 0.0)
