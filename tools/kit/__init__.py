"""The official AutoDL starting kit's runner: the kit's own ingestion and scoring, unmodified, on a model.py.

The kit itself is not part of the repository: the user points at a copy of
github.com/zhengying-liu/autodl_starting_kit_stable (`--kit GITDIR` or `$AUTODL_KIT_GIT`). One module per job:

- run.py: the command line (`python tools/kit/run.py ...`, `python -m tools.kit.run ...`) and one run;
- command.py: the same run as the `tools kit` subcommand, with the inputs checked first;
- export.py: a fresh copy of the kit for every run (git archive, or a folder copy);
- inputs.py: the dataset and code folders (`kit:NAME` / `kit:RELPATH` or a path);
- interpreter.py: does the kit's interpreter have what the kit imports;
- processes.py: ingestion and scoring as child process groups, their output logged;
- supervise.py: waiting for scoring, stopping a run that can no longer change;
- results.py: the kit's scores.txt, summary.json and the last stdout line;
- shim/: the compatibility shims that run inside the kit's processes (README.md says what they patch).

Nothing here imports TensorFlow or the solver's packages (autodl_core, meta_db, pretrained): `tools package
--verify` runs the runner under an import guard that would count those as the submission's imports.
"""
