"""Progress on stderr (tqdm when importable, else nothing), and atomic output directories."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys

from megatron_align.errors import UserError
from megatron_align.optional import optional_import


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "B"):
    tqdm = optional_import("tqdm")
    if not enabled or tqdm is None:
        return _NoBar()
    return tqdm.tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                     file=sys.stderr, dynamic_ncols=True, leave=False)


@contextlib.contextmanager
def atomic_output_dir(out: str, overwrite: bool):
    """Yield a temporary sibling of ``out`` to fill; rename it to ``out`` only when the body completes.

    A crash or error leaves no half-written ``out`` (the temporary is removed on errors; a SIGKILL leaves a
    ``.OUT.tmp-PID`` sibling that is obviously not the result).
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise UserError(f"{out}: already exists; choose another output directory or pass --overwrite")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):
        trash = os.path.join(parent, f".{os.path.basename(out)}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
