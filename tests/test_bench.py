"""tools.bench with a tiny dataset and a trivial solver, judged locally (one real run)."""
import json
import os
from pathlib import Path

import pytest

from tools import bench
from tools.shared_paths import default_kit_run
from tools.errors import UserInputError
try:  # functions shared with the runner tests (toy model.py, tiny dataset)
    from test_runner import make_tiny_dataset, write_code
except ImportError:  # tests/ made a package
    from tests.test_runner import make_tiny_dataset, write_code


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("bench_data"))


def test_parse_solvers(tmp_path):
    code = write_code(tmp_path / "toy", predict="prior", rounds=1)
    solvers = bench.parse_solvers(f"ours,kit:linear,mine={code}", ours_dir=tmp_path)
    assert [s.name for s in solvers] == ["ours", "kit:linear", "mine"]
    assert solvers[1].kit_path == "kit:AutoDL_simple_baseline_models/linear" and solvers[1].is_kit
    assert solvers[2].code_dir == code.resolve() and not solvers[2].is_kit
    with pytest.raises(UserInputError, match="no model.py"):
        bench.parse_solvers(f"{tmp_path / 'nothing'}")
    with pytest.raises(UserInputError, match="duplicate"):
        bench.parse_solvers(f"ours,ours")
    with pytest.raises(UserInputError, match="no solver"):
        bench.parse_solvers(" , ")


def test_markdown_table_hand_rows():
    rows = [
        dict(dataset="a", solver="s1", alc=0.5, final_nauc=0.6, time_to_first_prediction=1.234, peak_rss_bytes=2e9,
             status="ok", n_predictions=3, wall_time=10.0),
        dict(dataset="b", solver="s1", alc=0.3, final_nauc=0.4, time_to_first_prediction=2.0, peak_rss_bytes=1e9,
             status="time_budget_exceeded", n_predictions=2, wall_time=11.0),
        dict(dataset="a", solver="s2", alc=0.1, final_nauc=None, time_to_first_prediction=None, peak_rss_bytes=0,
             status="ok", n_predictions=1, wall_time=9.0),
    ]
    md = bench.markdown_tables(rows, ["s1", "s2"], ["a", "b"], 60, "local")
    assert "| a | 0.5000 | 0.1000 |" in md
    assert "| b | 0.3000* | - |" in md
    assert "| **mean ALC** | 0.4000 | 0.1000 (1/2) |" in md
    assert "| a | s1 | 0.5000 | 0.6000 | 1.23 | 2.00 | ok | 3 | 10 |" in md


def test_local_bench_runs_resumes_and_skips_kit(tmp_path, dataset):
    code = write_code(tmp_path / "toy", predict="random", rounds=2)
    solvers = bench.parse_solvers(f"toy={code},kit:linear")
    out = tmp_path / "bench"
    messages = []
    rows = bench.run_bench(solvers, [dataset], 30, out, judge="local", kit_run=str(tmp_path / "no_kit_run"),
                           kit_git=None, log=messages.append)
    assert any("skip kit:linear" in m and "kit_run not found" in m for m in messages)
    assert len(rows) == 1
    row = rows[0]
    assert row["solver"] == "toy" and row["judge"] == "local" and row["status"] == "ok"
    assert row["n_predictions"] == 2 and row["peak_rss_bytes"] > 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["alc"] == row["alc"]

    # resumable: the same configuration is not run again
    messages.clear()
    rows_again = bench.run_bench(solvers, [dataset], 30, out, judge="local", kit_run=None, kit_git=None,
                                 log=messages.append)
    assert rows_again == rows
    assert any("already in results.jsonl" in m for m in messages)
    assert len((out / "results.jsonl").read_text().splitlines()) == 1

    # a disturbed row (a neighbour used the machine) is run again only when asked; the new row replaces it
    disturbed = {**json.loads(lines[0]), "background_cpu": 0.3}
    (out / "results.jsonl").write_text(json.dumps(disturbed) + "\n")
    assert len(bench.run_bench(solvers, [dataset], 30, out, judge="local", kit_run=None, kit_git=None,
                               log=messages.append)) == 1
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    rerun = bench.run_bench(solvers, [dataset], 30, out, judge="local", kit_run=None, kit_git=None,
                            rerun_disturbed=True, log=messages.append)
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert len(rerun) == 1 and rerun[0]["background_cpu"] < 0.3
    rows = rerun
    row = rows[0]

    names = [s.name for s in solvers]
    md = bench.markdown_tables(rows, names, [row["dataset"]], 30, "local")
    assert f"| {row['dataset']} | {row['alc']:.4f} | - |" in md
    png = bench.plot_alc_bars(rows, names, [row["dataset"]], out / "alc.png", "test")
    assert png.stat().st_size > 0


def test_bad_bench_inputs(tmp_path):
    code = write_code(tmp_path / "toy", predict="prior")
    solvers = bench.parse_solvers(str(code))
    with pytest.raises(UserInputError, match="positive"):
        bench.run_bench(solvers, [tmp_path], 0, tmp_path / "out", judge="local")
    with pytest.raises(UserInputError, match=r"\.data"):
        bench.run_bench(solvers, [tmp_path], 10, tmp_path / "out", judge="local")
    with pytest.raises(UserInputError, match="judge"):
        bench.run_bench(solvers, [tmp_path], 10, tmp_path / "out", judge="platform")


KIT_GIT = os.environ.get("AUTODL_KIT_GIT")
KIT_RUN = default_kit_run()


@pytest.mark.skipif(bench.kit_available(KIT_RUN, KIT_GIT) is not None, reason="starting kit / kit_run not available")
def test_kit_judge_reports_alc_and_peak_memory(tmp_path, dataset):
    code = write_code(tmp_path / "toy", predict="random", rounds=2)
    rows = bench.run_bench(bench.parse_solvers(f"toy={code}"), [dataset], 20, tmp_path / "bench", judge="kit",
                           kit_run=KIT_RUN, kit_git=KIT_GIT, log=lambda m: None)
    assert len(rows) == 1
    row = rows[0]
    assert row["judge"] == "kit" and row["status"] == "ok", row.get("error")
    assert row["n_predictions"] == 2 and len(row["naucs"]) == 2
    assert row["time_to_first_prediction"] == row["timestamps"][0] > 0
    assert row["peak_rss_bytes"] > 100e6  # the kit's ingestion process with TensorFlow
    # the judge's ALC is the one our scorer computes on the same prediction folder
    from autodl_data.autodl_format import find_task
    from tools.scoring import score_prediction_dir

    ours = score_prediction_dir(find_task(dataset).solution_path, Path(row["out_dir"]) / "predictions")
    assert ours.alc == pytest.approx(row["alc"], abs=1e-6)
