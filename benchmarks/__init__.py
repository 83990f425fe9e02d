"""Ad-hoc speed measurements, run from the repository root (``python -m benchmarks.<module> --help``); not
installed. The measurements ``normdrop bench`` runs live in :mod:`normdrop.bench`."""
