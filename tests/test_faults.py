"""The fault suite's builders and checkers (its kit runs take half an hour: `tools faults`, not here),
and every hostile-file case of the tools run for real, in this process (`tools faults` runs them as
subprocesses, as a user would)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch._dynamo  # noqa: E402,F401  (triton before TensorFlow: the other order segfaults)

from autodl_data.autodl_format import AutoDLMetadata, check_tfrecord_framing, find_task, read_solution
from tools.errors import UserInputError
from tools.faults import checks, kit_cases, suite, tool_cases


# ------------------------------------------------------------------ checkers
def _write(path, rows):
    path.write_text("\n".join(" ".join(repr(float(v)) for v in row) for row in rows) + "\n")
    return path


def test_prediction_file_checks(tmp_path):
    good = _write(tmp_path / "t.predict_0", np.full((4, 3), 0.5))
    assert checks.check_prediction_file(good, (4, 3)) is None
    assert "shape (4, 3), expected (5, 3)" in checks.check_prediction_file(good, (5, 3))
    nan = _write(tmp_path / "t.predict_1", [[0.1, float("nan"), 0.2]] * 4)
    assert "non-finite" in checks.check_prediction_file(nan, (4, 3))
    high = _write(tmp_path / "t.predict_2", [[0.1, 1.5, 0.2]] * 4)
    assert "outside [0, 1]" in checks.check_prediction_file(high, (4, 3))
    (tmp_path / "t.predict_10").write_text("a b c\n")
    assert "not a numeric table" in checks.check_prediction_file(tmp_path / "t.predict_10", (1, 3))
    files = checks.prediction_files(tmp_path, "t")
    assert [f.name for f in files] == ["t.predict_0", "t.predict_1", "t.predict_2", "t.predict_10"]
    n, problems = checks.check_predictions(tmp_path, "t", (4, 3))
    assert n == 4 and len(problems) == 3


def test_call_overruns_are_read_from_the_solver_log():
    log = ("x INFO: train call 1 (thumbnails) took 1.2s; remaining 8.0s\n"
           "x INFO: test call 1 took 0.3s; remaining 7.1s\n"
           "x INFO: train call 2 (probe) took 13.0s; remaining -1.2s\n"
           "x INFO: test call 2 took 0.2s; remaining -2.4s\n"
           "2026 INFO ingestion.py: [+] 2 predictions made, time spent so far 7.64 sec\n")
    assert checks.call_overruns(log) == [-8.0, -7.1, 1.2, 0.2]  # the last started 2.2 s past its deadline
    assert checks.kit_prediction_times(log) == [7.64]
    assert checks.degradations("train step failed in stage probe; keeping the last good predictions") == 1


def _row(**kw):
    row = {"status": "ok", "ingestion_rc": 0, "n_predictions": 3, "prediction_problems": [], "last_prediction_s": 9.0,
           "time_budget": 10.0, "worst_overrun_s": -2.0, "peak_memory_gb": 1.5, "memory_limit_gb": 7.0}
    row.update(kw)
    return row


def test_verdict_names_each_broken_promise():
    assert checks.verdict(_row()) == []
    assert checks.verdict(_row(last_prediction_s=10.5)) == ["prediction at 10.5s > T"]
    assert checks.verdict(_row(worst_overrun_s=1.5)) == ["a call ended 1.5s past its deadline"]
    assert checks.verdict(_row(worst_overrun_s=0.9)) == []
    assert checks.verdict(_row(status="ingestion_died", ingestion_rc=-11, n_predictions=0)) == [
        "ingestion ingestion_died (exit -11)", "no prediction"]
    assert checks.verdict(_row(ingestion_rc=-15)) == []  # ended with success, stopped while shutting down
    assert checks.verdict(_row(prediction_problems=["x"])) == ["malformed predictions"]
    assert "peak memory" in checks.verdict(_row(peak_memory_gb=8.0))[0]


def test_markdown_counts_cases_per_category():
    rows = [dict(_row(), case="a", category="sizes", tf_mode="graph", alc=0.5, prediction_files=3,
                 first_prediction_s=1.0, test_shape=[4, 3], broken=[]),
            dict(_row(), case="b", category="sizes", tf_mode="graph", alc=0.5, prediction_files=3,
                 first_prediction_s=1.0, test_shape=[4, 3], broken=["ingestion crashed"]),
            {"case": "c", "category": "tools", "what": "w", "exit_status": 2, "message": "error: x|y", "broken": []}]
    text = suite.markdown(rows)
    assert "| sizes | 2 | 1 |" in text and "| tools | 1 | 1 |" in text
    assert "**broken: ingestion crashed**" in text and "x\\|y" in text


def test_case_registry_is_consistent():
    names = [c.name for c in kit_cases.CASES]
    assert len(names) == len(set(names))
    for case in kit_cases.CASES:
        assert case.category in kit_cases.CATEGORIES
        assert case.dataset in kit_cases.DATASETS or case.dataset in kit_cases.REAL_DATASETS
    assert {c.category for c in kit_cases.CASES} == set(kit_cases.CATEGORIES)
    kit, tools = suite.select_cases(["load", "pickled_npz"])
    assert kit and all(c.category == "load" for c in kit) and [c.name for c in tools] == ["pickled_npz"]
    assert suite.select_cases(["tools"])[0] == [] and len(suite.select_cases(["tools"])[1]) == len(tool_cases.CASES)
    with pytest.raises(UserInputError, match="unknown fault case"):
        suite.select_cases(["nope"])


def test_a_missing_corpus_is_reported_before_the_first_case(tmp_path):
    """The real dataset the selected cases need is looked for before any case runs."""
    with pytest.raises(UserInputError, match="cifar10 not found in the corpus"):
        suite.check_sources({"cifar10"}, tmp_path / "data", None, tmp_path / "no-corpus")
    suite.check_sources({"one_example_classes"}, tmp_path / "data", None, tmp_path / "no-corpus")
    suite.check_sources({"cifar10"}, tmp_path / "data", tmp_path / "converted", tmp_path / "no-corpus")
    (tmp_path / "corpus" / "cifar10").mkdir(parents=True)
    suite.check_sources({"cifar10"}, tmp_path / "data", None, tmp_path / "corpus")


# ------------------------------------------------------------------ builders
def test_one_example_classes_and_absent_classes_builders(tmp_path):
    one = find_task(kit_cases.build_one_example_classes(tmp_path, "one"))
    meta = AutoDLMetadata(one.train_dir)
    assert meta.size() == 5 * 40 + 5 and meta.get_output_size() == 10
    assert read_solution(one.solution_path).shape == (100, 10)
    absent = find_task(kit_cases.build_absent_classes(tmp_path, "absent"))
    assert read_solution(absent.solution_path)[:, 6:].sum() == 40  # test holds the classes training lacks


def test_dense_builder_keeps_channels_and_values(tmp_path):
    from autodl_data.autodl_format import AutoDLDataset

    task = find_task(kit_cases.build_values_beyond_255(tmp_path, "wild"))
    meta = AutoDLMetadata(task.train_dir)
    assert not meta.is_compressed() and meta.get_tensor_size() == (24, 24, 3)
    x, y = next(iter(AutoDLDataset(str(task.train_dir)).get_dataset()))
    x = np.asarray(x)
    assert x.shape == (1, 24, 24, 3) and x.min() < 0 and x.max() > 255 and np.asarray(y).sum() == 1
    four = find_task(kit_cases.build_channels_4_dense(tmp_path, "four"))
    assert AutoDLMetadata(four.test_dir).get_num_channels() == 4
    assert not list(tmp_path.glob(".*partial*"))


def test_multilabel_builders_rows(tmp_path):
    from autodl_data.autodl_format import AutoDLDataset

    task = find_task(kit_cases.build_multilabel_empty_rows(tmp_path, "ml"))
    solution = read_solution(task.solution_path)
    assert solution.shape == (120, 6) and (solution.sum(1) == 0).mean() > 0.2
    ones = find_task(kit_cases.build_labels_all_ones(tmp_path, "ones"))
    x, y = next(iter(AutoDLDataset(str(ones.train_dir)).get_dataset()))
    assert np.asarray(y).min() == 1  # training rows: all ones
    assert 0 < read_solution(ones.solution_path).mean() < 1  # test rows: scorable


# ------------------------------------------------------------------ TFRecord framing
def test_tfrecord_framing_check_names_a_truncated_file(tmp_path):
    task = find_task(kit_cases.build_channels_3(tmp_path, "c3"))
    record = next(task.train_dir.glob("*.tfrecord"))
    assert check_tfrecord_framing(record) == 200
    data = record.read_bytes()
    record.write_bytes(data[: len(data) - 10])
    with pytest.raises(UserInputError, match=f"{record.name}: truncated"):
        check_tfrecord_framing(record)


# ------------------------------------------------------------------ hostile files, for real
@pytest.mark.parametrize("case", tool_cases.CASES, ids=lambda c: c.name)
def test_tool_case_keeps_its_promise(tmp_path, case):
    row = suite.run_tool_case(case, tmp_path / case.name, in_process=True)
    assert row["exit_status"] != 0, row
    assert row["broken"] == [], json.dumps(row)
