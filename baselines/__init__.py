"""Methods benchmarked by stbench, one folder each (model.py, method.py, README.md, configs/).

They register through the `stbench.methods` entry-point group, exactly as a third-party package would.
"""
