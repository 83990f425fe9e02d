"""Integrations of normdrop with other frameworks, each an optional extra (``normdrop.integrations.lightning``:
``pip install 'normdrop[lightning]'``)."""
