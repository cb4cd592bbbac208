"""Writing result folders so that a failure leaves nothing half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ShedderError


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ShedderError(f"output directory {target} exists and is not empty (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    normal_permissions(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def normal_permissions(folder: str | os.PathLike[str]) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir``/``open`` would (umask applied).

    ``mkdtemp`` makes a 0700 folder and some writers (safetensors) 0600 files; a finished result
    folder should be as readable as any other the user creates.
    """
    mask = _umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, dir_mode)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                exec_bits = os.stat(path).st_mode & 0o111
                os.chmod(path, file_mode | (exec_bits & ~mask))
