"""The extended corpus: public image datasets rebuilt from recorded sources.

`../shared/datasets` holds the nine dev datasets; meta-learning needs more families. Each extra
dataset is a *recipe* (`tools/corpus/recipes/<name>.json`, data, no code): the source repository at
a commit, which files hold the images and labels (a *layout*, `layouts.py`), and every conversion
choice (split, subsample, re-encoding). `tools corpus build` reads the source files from a local git
snapshot of the repository and writes the corpus format of `../shared/datasets` (`data.npz` +
`info.json`), which `tools convert` turns into AutoDL datasets. The data itself never enters the
repository; the store keeps only meta-features and results.
"""
