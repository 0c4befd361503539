"""The perf benchmarks and analyses of particular methods and datasets (``<name>_perf`` / ``<name>_analysis``).

They sit in the top layer, beside the commands (they may build a whole CLI run), and are
imported only by ``python -m benchmark perf`` / ``analyze`` (``registry.discover_tools``), never by
a fit. A plugin registers its own through the entry-point groups ``benchmark.perf`` /
``benchmark.analysis``: this package holds the built-in ones only.
"""
