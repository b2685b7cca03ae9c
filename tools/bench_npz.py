"""`tools bench-npz`: pipelines x corpus datasets through `tools run-npz`, in one process, no TensorFlow.

The GPU check of docs/benchmarks.md: on a machine where TensorFlow cannot be installed (the GPU
machine), each dataset is decoded once and every pipeline runs on it in turn, each run scored like
the kit (tools/npz_run.py). One row per run: ALC, final NAUC, first-prediction time, GPU memory
peak, images/s (fine-tuning steps and frozen features, as the solver measured them), the strategy
the run used. Writes OUT/results.jsonl (one JSON line per run), OUT/table.md, and each run's
scores/report under OUT/<dataset>/<pipeline>/. `tools meta-train --import-npz OUT/results.jsonl`
stores a GPU machine's rows as that hardware's stratum (tools/import_npz.py).

    tools bench-npz --code-dir . --datasets DATA/cifar10=120 DATA/pneumoniamnist=30 \\
                    --pipelines default,cpu-path --out OUT

Pipelines: `default` (what the selector chooses on this machine), `cpu-path` (the CPU recipe forced:
{"strategy": "finetune_top"}), or NAME=JSON for any PipelineConfig fields.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tools.errors import UserInputError

NAMED_PIPELINES = {"default": None, "cpu-path": json.dumps({"strategy": "finetune_top"})}


def parse_datasets(items: list[str]) -> list[tuple[Path, float]]:
    jobs = []
    for item in items:
        folder, sep, budget = item.rpartition("=")
        if not sep:
            raise UserInputError(f"dataset {item!r}: expected FOLDER=SECONDS")
        try:
            seconds = float(budget)
        except ValueError:
            raise UserInputError(f"dataset {item!r}: the budget {budget!r} is not a number of seconds") from None
        jobs.append((Path(folder), seconds))
    return jobs


def parse_pipelines(text: str) -> list[tuple[str, str | None]]:
    pipelines = []
    for item in filter(None, (part.strip() for part in text.split(";" if "=" in text else ","))):
        if item in NAMED_PIPELINES:
            pipelines.append((item, NAMED_PIPELINES[item]))
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise UserInputError(f"pipeline {item!r}: use default, cpu-path or NAME=JSON")
        pipelines.append((name.strip(), value.strip()))
    if not pipelines:
        raise UserInputError("no pipeline given")
    return pipelines


def row_of(result: dict, dataset: str, pipeline: str) -> dict:
    stats = result.get("solver_stats") or {}
    gpu = result.get("gpu_peak_bytes")
    return {
        "dataset": dataset, "pipeline": pipeline, "time_budget": result["time_budget"], "status": result["status"],
        "alc": round(result["alc"], 4),
        "final_nauc": None if result["final_nauc"] is None else round(result["final_nauc"], 4),
        "first_prediction_s": None if result["time_to_first_prediction"] is None
        else round(result["time_to_first_prediction"], 2),
        "n_predictions": result["n_predictions"], "last_prediction_s": round(result["duration"], 1),
        "gpu_peak_gib": None if gpu is None else round(gpu / 2**30, 2),
        "peak_rss_gib": round(result["peak_rss_bytes"] / 2**30, 2),
        "strategy": stats.get("strategy"), "finetune_size": stats.get("finetune_size"),
        "train_batch": stats.get("train_batch"), "train_steps": stats.get("train_steps"),
        "train_images_per_s": stats.get("train_images_per_s"),
        "feature_images_per_s": stats.get("feature_images_per_s"),
        "init_s": None if result.get("init_seconds") is None else round(result["init_seconds"], 1),
        "device": result.get("device"), "error": result.get("error"),
        "pipeline_id": stats.get("pipeline_id"), "pipeline_config": stats.get("pipeline"),
        "dataset_dir": result.get("dataset_dir"), "code_version": result.get("code_version"),
        "timestamps": [round(t, 3) for t in result.get("timestamps") or []],
        "naucs": [round(v, 6) for v in result.get("naucs") or []],
    }


def markdown_table(rows: list[dict]) -> str:
    columns = ["dataset", "T (s)", "pipeline", "strategy", "ALC", "final NAUC", "first prediction (s)",
               "predictions", "GPU peak (GiB)", "train images/s", "feature images/s", "steps", "status"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        values = [r["dataset"], f"{r['time_budget']:g}", r["pipeline"], r["strategy"], r["alc"], r["final_nauc"],
                  r["first_prediction_s"], r["n_predictions"], r["gpu_peak_gib"], r["train_images_per_s"],
                  r["feature_images_per_s"], r["train_steps"], r["status"]]
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def bench_npz(code_dir, datasets: list[tuple[Path, float]], pipelines: list[tuple[str, str | None]], out_dir,
              log=print) -> list[dict]:
    from autodl_data.corpus_npz import load_corpus_npz
    from tools.npz_run import run_npz
    from tools.provenance import code_version

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out / "results.jsonl", "a") as results:
        for folder, budget in datasets:
            started = time.monotonic()
            try:
                data = load_corpus_npz(folder)
            except ValueError as exc:
                raise UserInputError(str(exc)) from None
            log(f"[bench-npz] {folder.name}: decoded in {time.monotonic() - started:.1f}s")
            for name, pipeline_json in pipelines:
                _reset_gpu_peak()
                result = run_npz(code_dir, folder, budget, out / folder.name / name, pipeline_json=pipeline_json,
                                 data=data)
                result["code_version"] = code_version(code_dir)
                row = row_of(result, folder.name, name)
                rows.append(row)
                results.write(json.dumps(row) + "\n")
                results.flush()
                log(f"[bench-npz] {json.dumps(row)}")
    (out / "table.md").write_text(markdown_table(rows))
    return rows


def _reset_gpu_peak():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _cli(args) -> int:
    rows = bench_npz(args.code_dir, parse_datasets(args.datasets), parse_pipelines(args.pipelines), args.out)
    print(markdown_table(rows), end="")
    return 0 if all(r["n_predictions"] > 0 for r in rows) else 3


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench-npz", help="pipelines x corpus datasets in one process, without TensorFlow",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--code-dir", default=".", help="folder holding model.py (default: here)")
    parser.add_argument("--datasets", nargs="+", required=True, metavar="FOLDER=SECONDS",
                        help="corpus folders (data.npz) with their time budgets")
    parser.add_argument("--pipelines", default="default,cpu-path",
                        help="comma-separated: default, cpu-path; or NAME=JSON items separated by ';'")
    parser.add_argument("--out", required=True, help="output folder")
    parser.set_defaults(func=_cli)
