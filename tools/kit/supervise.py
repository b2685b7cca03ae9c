"""Waiting for a run to end, as the platform would, and stopping one whose score can no longer change.

Scoring ends the run: it scores predictions as they appear and, when the budget is used up, kills
ingestion itself (the kit's own timing; the runner never stops ingestion at T). The runner steps in
only where scoring would wait for nothing:
- ingestion exited before writing start.txt (scoring would wait for it for half an hour);
- ingestion died without end.txt after starting: scoring would idle until the budget ends, so it is
  stopped once every prediction file is scored (or two minutes after the death), the ALC being final;
- a hard limit (Model.__init__'s 20 minutes + T + 10 minutes) against anything hanging.
"""
from __future__ import annotations

import os
import time

from tools.kit.processes import KitProcess
from tools.kit.results import count_predictions, parse_scores, read_key_values

INIT_LIMIT = 20 * 60  # ingestion's fixed limit for Model.__init__
POLL_S = 0.5
DEAD_INGESTION_WAIT_S = 120  # after ingestion died without end.txt, stop scoring this long after at most
SHUTDOWN_WAIT_S = 60  # a finished ingestion's interpreter gets this long to exit by itself


def hard_limit(time_budget: float) -> float:
    return INIT_LIMIT + time_budget + 600


def wait_for_scoring(ingestion: KitProcess, scoring: KitProcess, pred_dir: str, score_dir: str, task: str,
                     time_budget: float, t_launch: float) -> str | None:
    """Poll until scoring exits or the runner has to end the run; returns why the runner ended it
    (the summary's `note`), None when scoring ended by itself."""
    start_txt = os.path.join(pred_dir, "start.txt")
    end_txt = os.path.join(pred_dir, "end.txt")
    limit = hard_limit(time_budget)
    ingestion_died_at = None
    while scoring.alive():
        time.sleep(POLL_S)
        now = time.time()
        if now - t_launch > limit:
            return "runner hard limit (%ds) reached; killed everything" % limit
        if not ingestion.alive() and not os.path.isfile(end_txt):
            if not os.path.isfile(start_txt):
                return "ingestion exited (rc=%s) before writing start.txt" % (ingestion.p.returncode)
            if ingestion_died_at is None:
                ingestion_died_at = now
            # Ingestion died without end.txt and not at scoring's hands: scoring would idle until the
            # budget ends. Once it has scored every prediction file (the ALC cannot change after that),
            # stop it.
            n_files = count_predictions(pred_dir, task)
            n_scored = 0
            sp = os.path.join(score_dir, "scores.txt")
            if os.path.isfile(sp):
                n_scored = len(parse_scores(sp).get("nauc_scores", []))
            start_info = read_key_values(start_txt)
            budget_end = float(start_info.get("start_time", now)) + time_budget
            if now < budget_end - 2 and (n_scored >= n_files or now - ingestion_died_at > DEAD_INGESTION_WAIT_S):
                return ("ingestion exited (rc=%s) without end.txt; scoring stopped early after scoring all %d "
                        "prediction(s)" % (ingestion.p.returncode, n_files))
    return None


def let_ingestion_exit(ingestion: KitProcess, end_txt: str, note: str | None) -> None:
    """Ingestion finished normally (end.txt, no note): let its interpreter shut down by itself."""
    if note is None and os.path.isfile(end_txt):
        deadline = time.time() + SHUTDOWN_WAIT_S
        while ingestion.alive() and time.time() < deadline:
            time.sleep(0.2)
