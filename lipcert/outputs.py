"""Output files named on the command line (--json, --junit, --markdown, --plot): checked
before any work, so that a typo in a path never costs a long run, and written with errors
a user can act on."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError


def check_output_path(path: str | None, flag: str, stdout_ok: bool = False) -> None:
    """Refuse an output path that cannot be written, before computing anything.

    The check is the real one: the file is opened for appending (created if missing, and
    removed again), so read-only file systems, missing folders and directories all fail
    here rather than after the work.
    """
    if path is None or (stdout_ok and path == "-"):
        return
    if path == "-":
        raise InputError(f"{flag} -: this output cannot go to stdout; give a file path")
    p = Path(path)
    try:
        if p.is_dir():
            raise InputError(f"{flag} {path}: is a directory; give a file path")
        if p.exists() and not (p.is_file() or p.is_char_device()):
            raise InputError(f"{flag} {path}: not a regular file (a pipe, socket or device)")
        existed = p.exists()
        with open(p, "a"):
            pass
        if not existed:
            p.unlink()
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot be written ({exc.strerror or exc})") from None


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff")


def check_plot_path(path: str | None) -> None:
    """--plot: a writable file of a format matplotlib writes, and matplotlib installed."""
    if path is None:
        return
    if Path(path).suffix.lower() not in PLOT_SUFFIXES:
        raise InputError(f"--plot {path}: give a file ending in one of "
                         f"{', '.join(PLOT_SUFFIXES)}")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib: pip install 'lipcert[plot]'")
    check_output_path(path, "--plot")


def write_text(path: str, text: str, flag: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot be written ({exc.strerror or exc})") from None


def check_outputs(**paths: str | None) -> None:
    """``check_outputs(json=..., markdown=...)``: each named flag's path, '-' allowed for
    json and markdown (stdout)."""
    for name, path in paths.items():
        flag = "--" + name.replace("_", "-")
        check_output_path(path, flag, stdout_ok=name in ("json", "markdown"))
