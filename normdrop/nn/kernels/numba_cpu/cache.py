"""Where numba keeps this backend's compiled kernels: never inside the installed package.

numba's ``cache=True`` writes next to the source (``__pycache__``) by default, which fails or recompiles on every
start in a read-only install (site-packages owned by root, a container image). numba reads its cache directory
when a cached function is defined, so the package's ``__init__`` imports this module before any kernel module.
"""

from __future__ import annotations

import os

import numba

NUMBA_CACHE_ENV = "NORMDROP_NUMBA_CACHE_DIR"


def numba_cache_dir() -> str:
    """``$NUMBA_CACHE_DIR`` if the user set numba's own variable, else ``$NORMDROP_NUMBA_CACHE_DIR``, else
    ``<user cache dir>/normdrop/numba``."""
    import platformdirs

    return (
        os.environ.get("NUMBA_CACHE_DIR")
        or os.environ.get(NUMBA_CACHE_ENV)
        or os.path.join(platformdirs.user_cache_dir("normdrop"), "numba")
    )


numba.config.CACHE_DIR = numba_cache_dir()
