"""normdrop's speed measurements. ``normdrop bench`` runs ``bench_layers`` and ``bench_models``; every module also
runs on its own (``python -m benchmarks.<module> --help``)."""
