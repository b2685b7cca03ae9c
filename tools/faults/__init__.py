"""`tools faults`: the fault and load suite (docs/reliability.md).

The solver promises, for any input the kit can hand it: no crash, right-shaped finite predictions
in [0, 1], nothing predicted after the budget, no call that ends more than 1 s past its deadline,
bounded memory. The tools promise, for any bad file: a clear error naming the file and the
problem, a non-zero exit, nothing half-written. This package builds the cases that test those
promises (no committed data: every dataset is written by the suite itself) and checks them.

Modules, one job each:
  synth      synthetic images, labels and the dense (float tensor) AutoDL writer
  kit_cases  the registry of kit cases (dataset builder, budget, load, memory cap)
  checks     what a kit run must satisfy (prediction files, timing, memory)
  tool_cases hostile files for the tools commands, and what their errors must say
  suite      the runner and the `tools faults` command
"""
