"""Where pagedserve keeps what it builds or fetches once: `$PAGEDSERVE_CACHE_DIR`,
else `~/.cache/pagedserve`.

Everything in it is written privately and renamed into place, so a reader
never sees half of it and processes that race each finish with one whole copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("PAGEDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pagedserve")


def build_dir_once(target: Path, build: Callable[[Path], None], marker: str) -> Path:
    """`target`, built by `build(tmp)` into a private sibling and renamed into place.

    A directory holding `marker` is complete. When another process renames its
    copy first, ours is thrown away and theirs is used.
    """
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide it from other users of the cache
        try:
            os.rename(tmp, target)  # atomic; replaces an empty directory too
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
