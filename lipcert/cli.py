"""The ``lipcert`` command line. Exit codes: 0 ok, 1 gate failed, 2 usage or input error,
3 internal error (a bug: please report it)."""

from __future__ import annotations

import os
import sys

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import LipcertError

NORM = click.Choice(["2", "inf"], case_sensitive=False)
_err = Console(stderr=True, soft_wrap=True)


class LipcertGroup(click.Group):
    """Turns LipcertError into one clear line and its exit code; no tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LipcertError as exc:
            _err.print(f"[bold red]lipcert: error:[/bold red] {exc}", highlight=False)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:  # output piped into `head` and the like
            sys.stderr.close()
            sys.exit(0)
        except KeyboardInterrupt:
            _err.print("lipcert: interrupted")
            sys.exit(130)
        except Exception as exc:  # a bug: say so plainly
            if os.environ.get("LIPCERT_DEBUG"):
                raise
            _err.print(f"[bold red]lipcert: internal error:[/bold red] {type(exc).__name__}: "
                       f"{exc} (set LIPCERT_DEBUG=1 for a traceback; please report it)",
                       highlight=False)
            sys.exit(3)


@click.group(cls=LipcertGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lipcert")
def cli() -> None:
    """Certified Lipschitz bounds and robustness radii for ONNX neural networks."""


def parse_options(raw: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs; values are parsed as int, float or bool when they look like one."""
    from .errors import InputError

    options: dict = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--option {item!r}: expected KEY=VALUE")
        parsed: object = value
        for cast in (int, float):
            try:
                parsed = cast(value)
                break
            except ValueError:
                continue
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        options[key.strip().replace("-", "_")] = parsed
    return options


def _check_device(device: str) -> str:
    import torch

    from .errors import InputError

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available to torch here")
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"--device {device}: {exc}") from None
    return device


def _load(model: str, no_verify: bool):
    from .onnx_import import load

    with _err.status(f"importing {model} …"):
        return load(model, verify=not no_verify)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--method", "-m", default="naive", show_default=True,
              help="bounding method (see `lipcert methods`)")
@click.option("--norm", "-n", type=NORM, default="2", show_default=True,
              help="2: l2 -> l2 (spectral); inf: linf -> linf")
@click.option("--json", "json_out", metavar="OUT", help="write results as JSON ('-': stdout)")
@click.option("--no-verify", is_flag=True,
              help="skip the onnxruntime fidelity check (said in the result)")
@click.option("--device", default="cpu", show_default=True,
              help="torch device for methods that use one (gram): cpu, cuda, cuda:1, ...")
@click.option("--option", "-o", "raw_options", multiple=True, metavar="KEY=VALUE",
              help="method setting, e.g. -o iterations=12 (repeatable)")
def bound(model: str, method: str, norm: str, json_out: str | None, no_verify: bool,
          device: str, raw_options: tuple[str, ...]) -> None:
    """Print one certified upper bound on MODEL's Lipschitz constant."""
    from .errors import MethodNotApplicable
    from .estimators import run_estimator
    from .report import bounds_payload, bounds_table, print_table, write_json

    options = {"device": _check_device(device), **parse_options(raw_options)}
    graph = _load(model, no_verify)
    with _err.status(f"bounding with {method} …"):
        result = run_estimator(graph, method, norm, **options)
    print_table(bounds_table(graph, [result]), to_stderr=json_out == "-")
    if json_out:
        write_json(bounds_payload(graph, [result]), json_out)
    if result.upper is None and result.details.get("not_applicable"):
        raise MethodNotApplicable(result.notes[-1])


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--no-verify", is_flag=True, help="skip the onnxruntime fidelity check")
def inspect(model: str, no_verify: bool) -> None:
    """Show MODEL as lipcert reads it: IR nodes, ops, shapes, parameter counts."""
    from .report import inspect_table, print_table

    graph = _load(model, no_verify)
    print_table(inspect_table(graph))
    for note in graph.notes:
        click.echo(f"note: {note}")


@cli.command()
def methods() -> None:
    """List the bounding methods and what each supports."""
    from .estimators import REGISTRY, load_all
    from .onnx_import import supported_op_types

    load_all()
    table = Table(title="lipcert methods")
    for col in ("method", "norms", "scope", "certificate", "IR ops", "what it computes"):
        table.add_column(col, overflow="fold")
    for name, est in sorted(REGISTRY.items()):
        table.add_row(name, ", ".join(f"l{n}" for n in est.norms), est.scope,
                      "yes" if est.certificate else "no (estimate)",
                      ", ".join(est.supported_ops()), est.summary)
    Console().print(table)
    click.echo("ONNX ops the importer reads: " + ", ".join(supported_op_types()))


def main() -> None:
    cli(prog_name="lipcert")


if __name__ == "__main__":
    main()
