"""normdrop.bench: the speed measurements ``normdrop bench`` runs: :mod:`normdrop.bench.layers` (BatchNorm and
Dropout against torch.nn) and :mod:`normdrop.bench.models` (the lab's models, steps per second and MFU), timed by
:mod:`normdrop.bench.timing`. Each also runs on its own (``python -m normdrop.bench.layers --help``). Ad-hoc
measurements that the CLI does not run stay in the repository's ``benchmarks/`` folder."""
