"""``normdrop playground``: watch batch norm and dropout work, live, in a browser.

Two to four small networks train side by side in the server process on the same 2-D data (or MNIST-1D), batches
and seed, built from normdrop's own layers (``normdrop.models.build_model``); the page shows their decision
boundaries, curves, activation distributions, BN statistics, dropout masks and the variance shift, updated live
over a WebSocket. ``messages`` validates what the page sends, ``session`` trains and measures, ``server`` serves
(``serve`` is what the CLI calls), ``bench`` measures its speed.
"""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
