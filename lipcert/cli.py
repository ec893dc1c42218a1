"""The ``lipcert`` command line. Exit codes: 0 ok, 1 gate failed, 2 usage or input error,
3 internal error (a bug: please report it)."""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager

import click
from rich.console import Console
from rich.markup import escape

from . import __version__
from .errors import LipcertError

NORM = click.Choice(["2", "inf"], case_sensitive=False)
SELF_CHECK_HELP = ("skip the soundness self-check (sampled lower bound against every printed "
                   "upper bound; attacks on certified samples); the result says so")
_err = Console(stderr=True, soft_wrap=True)


class LipcertGroup(click.Group):
    """Turns LipcertError into one clear line and its exit code; no tracebacks."""

    def invoke(self, ctx: click.Context):
        import warnings

        try:
            with warnings.catch_warnings():
                # library warnings (numpy overflow in a user's model, torch deprecations)
                # are not messages for a person: what matters is in the result or the error
                if not os.environ.get("LIPCERT_DEBUG"):
                    warnings.simplefilter("ignore")
                return super().invoke(ctx)
        except LipcertError as exc:
            _err.print(f"[bold red]lipcert: error:[/bold red] {escape(one_line(exc))}",
                       highlight=False)
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
                       f"{escape(one_line(exc))} (set LIPCERT_DEBUG=1 for a traceback; please "
                       "report it)", highlight=False)
            sys.exit(3)


@contextmanager
def _working(text: str):
    """A transient status line on stderr with a spinner and the time elapsed (refreshed
    even while the work reports nothing); yields the function that changes its text."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=_err, transient=True) as bar:
        task = bar.add_task(text, total=None)
        yield lambda new: bar.update(task, description=escape(new))


def one_line(exc: BaseException, limit: int = 2000) -> str:
    """A message on one line (onnxruntime and solvers write several), cut at ``limit``."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@click.group(cls=LipcertGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lipcert")
def cli() -> None:
    """Certified Lipschitz bounds and robustness radii for ONNX neural networks."""


#: run-context keys the Python API takes but -o cannot carry (arrays, callables), with the
#: flag that sets them where there is one
_NOT_OPTIONS = {"center": "--input/--index", "eps": "--eps", "queries": None,
                "targets": None, "progress": None}


def parse_options(raw: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs; values are parsed as int, float or bool when they look like one."""
    from .errors import InputError

    options: dict = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--option {item!r}: expected KEY=VALUE")
        name = key.strip().replace("-", "_")
        if name in _NOT_OPTIONS:
            flag = _NOT_OPTIONS[name]
            raise InputError(f"--option {item!r}: {name} is not a method setting"
                             + (f"; use {flag}" if flag else
                                " (the Python API takes it; the CLI sets it itself)"))
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
    import re

    import torch

    from .errors import InputError

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise InputError(f"--device {device!r}: give cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available to torch here")
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"--device {device}: {exc}") from None
    return device


def _region(input_path: str | None, index: int | None, eps: float | None,
            domain: str | None) -> dict:
    """The input region of local methods: a point with --eps, and/or a --domain range."""
    from .config import load_point
    from .errors import InputError
    from .estimators.common.region import parse_domain, parse_eps

    region: dict = {}
    if domain:
        region["domain"] = parse_domain(domain)
    if input_path is not None or eps is not None:
        if input_path is None or eps is None:
            raise InputError("a local box needs both --input and --eps")
        region.update(center=load_point(input_path, index).reshape(-1), eps=parse_eps(eps))
    return region


def _check_region(graph, region: dict) -> None:
    from .errors import InputError

    n_inputs = 1
    for d in graph.input_shape:
        n_inputs *= d
    if "center" in region and region["center"].size != n_inputs:
        raise InputError(f"--input has {region['center'].size} values; the model takes "
                         f"{graph.input_shape}")


def _check_method_settings(names: list[str], settings: dict) -> None:
    """Refuse unknown methods and bad settings before any work (exit 2, naming the key)."""
    from .errors import InputError
    from .estimators import get_estimator

    if not isinstance(settings, dict):
        raise InputError("[methods] must be a table of [methods.NAME] tables")
    for name in sorted(set(names) | set(settings)):
        estimator = get_estimator(name)
        table = settings.get(name, {})
        if not isinstance(table, dict):
            raise InputError(f"[methods.{name}] must be a table of settings")
        estimator.parse_settings({k: v for k, v in table.items() if k != "timeout"})


def _load(model: str, no_verify: bool):
    from .onnx_import import load

    with _err.status(f"importing {model} …"):
        return load(model, verify=not no_verify)


@cli.command(short_help="One certified upper bound on the Lipschitz constant.")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--method", "-m", default="naive", show_default=True,
              help="bounding method: naive, gram, lipsdp, local, exact (reference), lower "
                   "(estimate); see `lipcert methods`")
@click.option("--norm", "-n", type=NORM, default="2", show_default=True,
              help="2: l2 -> l2 (spectral); inf: linf -> linf")
@click.option("--json", "json_out", metavar="OUT", help="write results as JSON ('-': stdout)")
@click.option("--no-verify", is_flag=True,
              help="skip the onnxruntime fidelity check (said in the result)")
@click.option("--device", default="cpu", show_default=True,
              help="torch device for methods that use one (gram, local): cpu, cuda, "
                   "cuda:1, ...")
@click.option("--input", "input_path", help="point x0 (.npy, or .npz with --index) for a local "
                                            "box of radius --eps (methods local, exact, lower)")
@click.option("--index", type=int, help="sample index in --input's batch")
@click.option("--eps", type=float, help="linf radius of the box around --input")
@click.option("--domain", help="input range LOW,HIGH: clips the box (e.g. 0,1 for images)")
@click.option("--option", "-o", "raw_options", multiple=True, metavar="KEY=VALUE",
              help="method setting, e.g. -o iterations=12 (repeatable)")
@click.option("--no-self-check", is_flag=True, help=SELF_CHECK_HELP)
def bound(model: str, method: str, norm: str, json_out: str | None, no_verify: bool,
          device: str, input_path: str | None, index: int | None, eps: float | None,
          domain: str | None, raw_options: tuple[str, ...], no_self_check: bool) -> None:
    """Print one certified upper bound on MODEL's Lipschitz constant (on a box with
    --input/--eps for local methods)."""
    from .errors import InternalCheckFailed, MethodNotApplicable
    from .estimators import get_estimator, run_estimator
    from .outputs import check_outputs
    from .report import bounds_payload, bounds_table, print_table, write_json

    check_outputs(json=json_out)
    options = {"device": _check_device(device), **_region(input_path, index, eps, domain),
               **parse_options(raw_options)}
    get_estimator(method).parse_settings(options)
    graph = _load(model, no_verify)
    _check_region(graph, options)
    with _working(f"{method}: working …") as update:
        options.setdefault("progress", lambda text: update(
            f"{method}: {text} …" if text else f"{method}: working …"))
        result = run_estimator(graph, method, norm, self_check=not no_self_check, **options)
    if result.internal_error:  # print no table with a number-shaped hole: say why, exit 3
        raise InternalCheckFailed(result.notes[-1])
    if result.upper is None and result.details.get("not_applicable"):
        raise MethodNotApplicable(result.notes[-1])  # one line, nothing else
    print_table(bounds_table(graph, [result]), to_stderr=json_out == "-")
    if json_out:
        write_json(bounds_payload(graph, [result]), json_out)


@cli.command(short_help="Certified radii and accuracy per sample; a CI gate.")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--data", help="test data: .npz with arrays x and y, or x.npy with --labels")
@click.option("--labels", help="labels .npy when --data is an .npy")
@click.option("--eps", type=float, help="radius to certify (in the norm of --norm)")
@click.option("--norm", "-n", type=NORM, help="2 or inf  [default: 2]")
@click.option("--method", "-m", help="bounding method: naive, gram, lipsdp (global) or local "
                                     "(each sample's box)  [default: naive]")
@click.option("--min-certified-accuracy", "gate", type=float,
              help="CI gate: exit 1 if certified accuracy at eps is below this fraction")
@click.option("--report-eps", help="comma-separated radii for the summary (default: eps x "
                                   "0.25, 0.5, 1, 2, 4)")
@click.option("--json", "json_out", metavar="OUT", help="write results as JSON ('-': stdout)")
@click.option("--junit", metavar="OUT.xml", help="write a JUnit XML report (gate test case)")
@click.option("--junit-per-sample", is_flag=True, help="also one JUnit test case per sample")
@click.option("--config", "config_path", help="TOML file with a [certify] table")
@click.option("--no-verify", is_flag=True, help="skip the onnxruntime fidelity check")
@click.option("--device", help="torch device for methods that use one (gram, local)  "
                                  "[default: cpu]")
@click.option("--option", "-o", "raw_options", multiple=True, metavar="KEY=VALUE",
              help="method setting (repeatable)")
@click.option("--no-self-check", is_flag=True, help=SELF_CHECK_HELP)
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="processes that bound the samples' boxes (local)  [default: 1]")
@click.option("--checkpoint", metavar="FILE.jsonl",
              help="append every finished sample to FILE (a run can then be resumed)")
@click.option("--resume", is_flag=True,
              help="continue the run in --checkpoint FILE, skipping samples it has")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              metavar="[ADDRESS]",
              help="run the samples as Ray tasks: auto (the running cluster), an address, "
                   "or no value (a local instance; --workers sets its CPUs)")
@click.option("--pair-bounds", "pair_bounds", type=click.Choice(["each", "global"]),
              default=None,
              help="global methods: bound each class pair's logit difference (each), or "
                   "bound f once and use ||e_y - e_j|| L for every pair (global: one run; "
                   "the radius 1-Lipschitz training claims)  [default: each]")
@click.option("--shells", type=int, default=None,
              help="local: nested boxes per sample (radius from the integral of their "
                   "gradient bounds; 1 = the eps box alone)  [default: 8]")
@click.option("--margin-bounds/--no-margin-bounds", "margin_bounds", default=None,
              help="local: also bound each logit difference from below on the sample's "
                   "boxes, a second certificate (--no-margin-bounds: radii from gradient "
                   "bounds alone, to compare Lipschitz methods)  [default: on]")
def certify(model, data, labels, eps, norm, method, gate, report_eps, json_out, junit,
            junit_per_sample, config_path, no_verify, device, raw_options,
            no_self_check, workers, checkpoint, resume, ray_address, pair_bounds,
            shells, margin_bounds) -> None:
    """Certified radius per sample and certified accuracy; a CI gate (exit 1 below it)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from . import certify as C
    from .config import method_options, read_config
    from .errors import InputError
    from .estimators import parse_norm
    from .estimators.common.region import parse_eps
    from .outputs import check_outputs
    from .report import certify_payload, certify_table, print_table, write_json, write_junit

    check_outputs(json=json_out, junit=junit)
    full_cfg = read_config(config_path)
    cfg = full_cfg.get("certify", {})
    model = model or cfg.get("model")
    data = data or cfg.get("data")
    labels = labels or cfg.get("labels")
    eps = eps if eps is not None else cfg.get("eps")
    norm = parse_norm(norm or cfg.get("norm", "2"))
    method = method or cfg.get("method", "naive")
    gate = gate if gate is not None else cfg.get("min_certified_accuracy")
    options = {**method_options(full_cfg, method), **cfg.get("options", {}),
               **parse_options(raw_options)}
    options["device"] = _check_device(device or cfg.get("device", "cpu"))
    required = (("MODEL", model), ("--data", data), ("--eps", eps))
    missing = [name for name, value in required if value is None]
    if missing:
        raise InputError(f"certify needs {', '.join(missing)} (on the command line or in "
                         "--config)")
    if gate is not None and not 0.0 <= float(gate) <= 1.0:
        raise InputError(f"--min-certified-accuracy {gate}: give a fraction in [0, 1], "
                         "e.g. 0.8")
    eps = parse_eps(eps)
    eps_list = _report_eps(report_eps, cfg.get("report_eps"), eps)
    C._check_method(method, norm).parse_settings(options)
    workers = int(workers if workers is not None else cfg.get("workers", 1))
    checkpoint = checkpoint or cfg.get("checkpoint")
    ray_address = ray_address or cfg.get("ray")
    pair_bounds = pair_bounds or cfg.get("pair_bounds", "each")
    shells = shells if shells is not None else cfg.get("shells")
    # a config value is a bool already (config.CERTIFY_KEYS)
    margin_bounds = margin_bounds if margin_bounds is not None else cfg.get("margin_bounds",
                                                                             True)
    if resume and not checkpoint:
        raise InputError("--resume needs --checkpoint FILE (the run to continue)")
    if checkpoint:
        check_outputs(checkpoint=checkpoint)
    x, y = C.load_data(data, labels)
    graph = _load(model, no_verify)
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=_err, transient=True) as progress:
        task = progress.add_task(f"bounding logit differences ({method}, l{norm})", total=None)

        def tick(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        cert = C.certify(graph, x, y, eps=eps, method=method, norm=norm, options=options,
                         progress=tick, self_check=not no_self_check, workers=workers,
                         checkpoint=checkpoint, resume=resume, ray=ray_address,
                         pair_bounds=pair_bounds, shells=shells,
                         margin_bounds=margin_bounds)
    summary = cert.summary(eps_list)
    print_table(certify_table(graph, cert, summary, gate), to_stderr=json_out == "-")
    if json_out:
        write_json(certify_payload(graph, cert, summary, gate), json_out)
    if junit:
        write_junit(junit, graph, cert, summary, gate, junit_per_sample)
    if gate is not None and summary["certified_accuracy"] < float(gate):
        sys.exit(1)


def _report_eps(given: str | None, configured: list | None, eps: float) -> list[float]:
    """The radii of the summary: --report-eps, the config's, or eps x 0.25 .. 4 (with eps)."""
    from .errors import InputError

    if given:
        try:
            eps_list = sorted({float(e) for e in str(given).split(",") if e.strip()})
        except ValueError:
            raise InputError(f"--report-eps {given!r}: expected numbers") from None
    elif configured:
        eps_list = sorted(float(e) for e in configured)
    else:
        eps_list = sorted({eps * k for k in (0.25, 0.5, 1.0, 2.0, 4.0)} | {0.0})
    eps_list = sorted(set(eps_list) | {eps})
    if not all(math.isfinite(e) and e >= 0 for e in eps_list):
        raise InputError(f"--report-eps {given or configured}: give finite radii >= 0")
    return eps_list


@cli.command(short_help="All methods side by side with a lower bound.")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--methods", default=None,
              help="comma-separated methods  [default: naive,gram,lipsdp for --norm 2; "
                   "naive,lipsdp,local,exact for --norm inf]")
@click.option("--norm", "-n", type=NORM, help="2 or inf  [default: 2]")
@click.option("--input", "input_path", help="point x0 (.npy, or .npz with --index) for a local "
                                            "box of radius --eps")
@click.option("--index", type=int, help="sample index in --input's batch")
@click.option("--eps", type=float, help="linf radius of the box around --input")
@click.option("--domain", help="input range LOW,HIGH (clips the box; exact's domain)")
@click.option("--timeout", type=float, help="seconds per method  [default: 120]")
@click.option("--json", "json_out", metavar="OUT", help="write results as JSON ('-': stdout)")
@click.option("--markdown", metavar="OUT", help="write a Markdown table ('-': stdout)")
@click.option("--plot", metavar="OUT.png", help="write a bar chart (log scale)")
@click.option("--config", "config_path", help="TOML file: [compare] and [methods.NAME]")
@click.option("--no-verify", is_flag=True, help="skip the onnxruntime fidelity check")
@click.option("--device", default="cpu", show_default=True, help="torch device (gram, local)")
@click.option("--no-self-check", is_flag=True, help=SELF_CHECK_HELP)
def compare(model, methods, norm, input_path, index, eps, domain, timeout, json_out, markdown,
            plot, config_path, no_verify, device, no_self_check) -> None:
    """Every method side by side with a lower bound, the tightness ratio and the time."""
    from .method_worker import MethodWorker

    worker = MethodWorker().launch()  # its imports overlap ours and loading the model
    try:
        _compare(worker, model, methods, norm, input_path, index, eps, domain, timeout,
                 json_out, markdown, plot, config_path, no_verify, device, no_self_check)
    finally:
        worker.close()


def _compare(worker, model, methods, norm, input_path, index, eps, domain, timeout, json_out,
             markdown, plot, config_path, no_verify, device, no_self_check) -> None:
    from . import compare as CMP
    from .config import read_config
    from .errors import InputError
    from .estimators import parse_norm
    from .outputs import check_outputs, check_plot_path, write_text
    from .report import (
        bounds_payload,
        compare_markdown,
        compare_plot,
        compare_table,
        print_table,
        write_json,
    )

    if json_out == "-" and markdown == "-":
        raise InputError("--json - and --markdown - both write to stdout; send one of them to "
                         "a file")
    check_outputs(json=json_out, markdown=markdown)
    check_plot_path(plot)
    cfg = read_config(config_path)
    section = cfg.get("compare", {})
    norm = parse_norm(norm or section.get("norm", "2"))
    if methods is not None:
        names = methods.split(",")
    elif "methods" in section:
        names = list(section["methods"])
    else:  # the defaults that apply to this norm (CMP.default_methods)
        names = CMP.default_methods(norm)
    names = [m.strip() for m in names if m.strip()]
    if not names:
        raise InputError("--methods: give at least one method, e.g. --methods naive,gram")
    _check_method_settings(names, cfg.get("methods", {}))
    timeout = float(timeout if timeout is not None else section.get("timeout", 120.0))
    if not (math.isfinite(timeout) and timeout > 0):  # NaN fails too
        raise InputError(f"--timeout {timeout:g}: give a positive number of seconds per method")
    region = _region(input_path, index, eps, domain)
    options = {name: {**cfg.get("methods", {}).get(name, {})} for name in [*names, "lower"]}
    _check_device(device)
    for name in names:
        options[name].setdefault("device", device)
    graph = _load(model, no_verify)
    _check_region(graph, region)
    with _working("sampled lower bound …") as update:
        results, lower = CMP.compare(
            graph, names, norm, options=options, timeout=timeout, region=region,
            progress=lambda m, line: update(
                f"{m} ({names.index(m) + 1} of {len(names)}, at most {timeout:g} s)"
                + (" …" if line is None else f": {line}")),
            self_check=not no_self_check, worker=worker)
    region_given = bool(region)
    rows = CMP.compare_payload_rows(results, lower, region_given)
    best = CMP.best_lower(results, lower, region_given)
    print_table(compare_table(graph, rows, lower, best), to_stderr="-" in (json_out, markdown))
    if json_out:
        payload = bounds_payload(graph, [], lower_bound=lower.to_json(),
                                 best_lower_bound=None if best is None else {
                                     "value": best.value, "source": best.source,
                                     "region": best.region},
                                 region={k: v for k, v in region.items() if k != "center"}
                                 | ({"has_center": True} if "center" in region else {}))
        payload["results"] = rows
        write_json(payload, json_out)
    if markdown:
        text = compare_markdown(graph, rows, lower, best)
        if markdown == "-":
            click.echo(text)
        else:
            write_text(markdown, text, "--markdown")
    if plot:
        compare_plot(graph, rows, lower, best, plot)
    failed = [r for r in results if r.internal_error]
    if failed:
        from .errors import InternalCheckFailed

        raise InternalCheckFailed(f"method {failed[0].method}: {failed[0].notes[-1]}")


@cli.command(short_help="The graph as lipcert reads it.")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--no-verify", is_flag=True, help="skip the onnxruntime fidelity check")
def inspect(model: str, no_verify: bool) -> None:
    """Show MODEL as lipcert reads it: IR nodes, ops, shapes, parameter counts."""
    from .report import inspect_table

    graph = _load(model, no_verify)
    console = Console()
    console.print(inspect_table(graph))
    for note in graph.notes:
        console.print(f"note: {note}", highlight=False, markup=False)


@cli.command(short_help="The methods, norms, ops and settings.")
def methods() -> None:
    """List the bounding methods and what each supports."""
    from .estimators import REGISTRY, load_all
    from .onnx_import import supported_op_types
    from .tables import Column, FoldingTable

    load_all()
    from .estimators.settings import describe

    table = FoldingTable("lipcert methods", [
        Column("method"), Column("norms"), Column("scope"), Column("certificate"),
        Column("IR ops", fold=True), Column("settings (-o KEY=VALUE)", fold=True),
        Column("what it computes", fold=True)])
    for name, est in sorted(REGISTRY.items()):
        settings = ", ".join(f"{row['name']}={row['default']}" if row["default"] is not None
                             else row["name"] for row in describe(est.settings)) or "-"
        table.add_row(name, ", ".join(f"l{n}" for n in est.norms), est.scope,
                      "yes" if est.certificate else "no (estimate)",
                      ", ".join(est.supported_ops()), escape(settings), escape(est.summary))
    console = Console()
    console.print(table)
    console.print("ONNX ops the importer reads: " + ", ".join(supported_op_types()),
                  highlight=False, markup=False)


def main() -> None:
    cli(prog_name="lipcert")


if __name__ == "__main__":
    main()
