"""Reading arrays from .npy / .npz files with errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError


def read_arrays(path: str | Path, names: tuple[str, ...], what: str) -> list[np.ndarray]:
    """The arrays ``names`` of an .npz, or the single array of an .npy (``names`` ignored)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such {what} file")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as npz:
                missing = set(names) - set(npz.files)
                if missing:
                    raise InputError(f"{path}: the .npz needs arrays {sorted(names)} (has "
                                     f"{sorted(npz.files)})")
                return [npz[n] for n in names]
        return [np.load(p, allow_pickle=False)]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc})") from None
