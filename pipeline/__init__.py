"""Corpus pipeline: manifest → read → filter → exact dedup → near dedup → tokenize → Arrow shards.

Reading order: ``build.py`` (entry point, driver, index/report), ``manifest.py`` (the YAML
schema), ``stages.py`` (each stage as a plain function over one unit of work), ``read.py`` and
``filters.py`` (formats and quality heuristics), ``executor.py`` (in-process or Ray), and
``dedup/`` (MinHash near-duplicate removal).
"""
