"""Compatibility shims for the starting kit's programs (see tools/kit/README.md).

Not imported by the project: boot.py is started as a script by tools/kit/run.py, inside each kit
process, and loads tf1_estimator.py by its path. Both therefore import nothing of the project. The
folder is a package only so that an installed copy of `tools` ships them.
"""
