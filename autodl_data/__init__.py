"""autodl_data: the dataset formats the solver is run and measured on, read and written without the kit.

`autodl_format`: the AutoDL folder format (task folder, metadata, TFRecord framing, readers with the
kit's semantics, the writer `tools convert` uses); `corpus_npz`: a corpus `data.npz` folder read into
the solver's in-memory datasets (`autodl_core.arrays.ArrayDataset`). Above the solver (it imports
autodl_core, never the reverse), below meta_db and tools; the submission does not ship it.
"""
