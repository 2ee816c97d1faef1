"""The ``butlerfs`` command, and the same commands as ``butler`` subcommands.

The CLI parses and prints; `butlerfs.mounting` and friends compute. A user
mistake is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

from wrapper.options import RunOptions, TransferMode, run_defaults
from wrapper.sandbox import SandboxMode
from wrapper.workspace import OverlayMode

from . import __version__
from .errors import UsageError
from .mounting import MountOptions

__all__ = ["butler_plugin_commands", "main", "run_options"]


def _split_commas(ctx: click.Context, param: click.Parameter, values: Iterable[str]) -> tuple[str, ...]:
    """Accept ``-c a,b -c c`` as butler commands do."""
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``10G``, ``512M``, ``1.5T`` or a number of bytes.

    Raises
    ------
    click.BadParameter
        For anything else.
    """
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = cleaned[-1:] if cleaned[-1:] in _UNITS else ""
    try:
        value = float(cleaned[: len(cleaned) - len(unit)])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size such as 10G, 512M or 1000000") from None
    if value < 0:
        raise click.BadParameter(f"{text!r} is negative")
    return int(value * _UNITS[unit])


def format_size(n: int) -> str:
    """Write a byte count as `parse_size` reads it, in the largest exact unit (``10G``)."""
    for unit in "TGMK":
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


# The mount's defaults live in `MountOptions`; the options below show them.
_MOUNT_DEFAULTS: dict[str, Any] = {field.name: field.default for field in dataclasses.fields(MountOptions)}


def _size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else parse_size(value)


cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Block cache of remote (S3) artifacts; may be shared by several mounts. "
    "Default: $XDG_CACHE_HOME/butlerfs.",
)
cache_size_option = click.option(
    "--cache-size",
    default=format_size(_MOUNT_DEFAULTS["cache_size"]),
    show_default=True,
    callback=_size_option,
    help="Cache size limit (LRU eviction); 0 disables the disk cache.",
)


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn `UsageError` into click's one-line error and exit status."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UsageError as err:
            raise click.ClickException(str(err)) from None

    return wrapper


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # Query plans and SQL are the Butler's business, not the user's.
    logging.getLogger("lsst.daf.butler").setLevel(max(logging.WARNING, logging.getLogger().level))


collections_option = click.option(
    "--collections",
    "-c",
    multiple=True,
    callback=_split_commas,
    metavar="COLL",
    help="Collections to search, in order (find-first; CHAINED collections work). Repeat or comma-separate.",
)
dataset_type_option = click.option(
    "--dataset-type",
    "-t",
    "dataset_types",
    multiple=True,
    callback=_split_commas,
    metavar="TYPE",
    help="Dataset types to show (names or glob patterns). Default: every type in the collections.",
)
where_option = click.option(
    "--where",
    "-w",
    default="",
    metavar="EXPR",
    help='Butler query expression constraining the datasets shown, e.g. "visit = 733724".',
)


@click.command("mount")
@click.argument("repo")
@click.argument("mountpoint")
@collections_option
@dataset_type_option
@where_option
@click.option(
    "--refresh",
    default=_MOUNT_DEFAULTS["refresh"],
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds a directory listing is trusted before the registry is asked again.",
)
@click.option(
    "--subtree-limit",
    default=_MOUNT_DEFAULTS["subtree_limit"],
    show_default=True,
    type=click.IntRange(min=0),
    help="Most datasets fetched by one registry query (a directory with more is fetched in pieces).",
)
@click.option(
    "--layout",
    default=_MOUNT_DEFAULTS["layout"],
    show_default=True,
    type=click.Choice(["default", "flat"]),
    help="flat: no directory for the last dimension; its files sit in the directory above.",
)
@click.option(
    "--mtime",
    default=_MOUNT_DEFAULTS["mtime"],
    show_default=True,
    type=click.Choice(["ingest", "listed"]),
    help="Files' mtime: each dataset's ingest date, or when the mount first listed it (faster).",
)
@click.option(
    "--memory-limit",
    default=format_size(_MOUNT_DEFAULTS["memory_limit"]),
    show_default=True,
    callback=_size_option,
    help="Listings held in memory; beyond it the least recently used are dropped and fetched again.",
)
@click.option(
    "--no-index",
    is_flag=True,
    help="Keep no on-disk listing index (default: kept under the cache directory for the next mount).",
)
@cache_dir_option
@cache_size_option
@click.option(
    "--fetch-concurrency",
    default=_MOUNT_DEFAULTS["fetch_concurrency"],
    show_default=True,
    type=click.IntRange(min=1),
    help="Most S3 requests in flight for the whole mount.",
)
@click.option(
    "--timeout",
    default=_MOUNT_DEFAULTS["timeout"],
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds after which a remote read that keeps failing (endpoint down or stalled) returns EIO.",
)
@click.option("--foreground", "-f", is_flag=True, help="Serve in this process until unmounted (Ctrl-C).")
@click.option("--allow-other", is_flag=True, help="Let other users read the mount.")
@click.option("--single-thread", is_flag=True, help="Serve FUSE requests on one thread (for debugging).")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Daemon log (default: under $XDG_RUNTIME_DIR or /tmp).",
)
@click.option(
    "--log-level",
    default=_MOUNT_DEFAULTS["log_level"],
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@_user_errors
def mount_command(
    repo: str,
    mountpoint: str,
    collections: tuple[str, ...],
    dataset_types: tuple[str, ...],
    where: str,
    refresh: float,
    subtree_limit: int,
    layout: str,
    mtime: str,
    memory_limit: int,
    no_index: bool,
    cache_dir: str | None,
    cache_size: int,
    fetch_concurrency: int,
    timeout: float,
    foreground: bool,
    allow_other: bool,
    single_thread: bool,
    log_file: str | None,
    log_level: str,
) -> None:
    """Mount Butler repository REPO read-only at MOUNTPOINT.

    Datasets appear as MOUNTPOINT/<dataset type>/<dimension>_<value>/.../<file>.
    Without --foreground the command returns once the mount is ready.
    """
    from .mounting import preflight, serve, spawn

    options = MountOptions(
        repo=repo,
        mountpoint=mountpoint,
        collections=collections,
        dataset_types=dataset_types,
        where=where,
        refresh=refresh,
        subtree_limit=subtree_limit,
        layout=layout,
        mtime=mtime,
        memory_limit=memory_limit,
        index=not no_index,
        cache_dir=cache_dir,
        cache_size=cache_size,
        fetch_concurrency=fetch_concurrency,
        timeout=timeout,
        threads=not single_thread,
        allow_other=allow_other,
        log_file=log_file,
        log_level=log_level.upper(),
    )
    if foreground:
        _configure_logging(log_level)
        options.mountpoint = preflight(mountpoint)
        serve(options, on_mounted=lambda: click.echo(f"Mounted {repo} at {options.mountpoint}", err=True))
        return
    pid = spawn(options)
    click.echo(f"Mounted {repo} at {options.mountpoint} (daemon {pid}, log {options.log_file})")


@click.command("umount")
@click.argument("mountpoint")
@_user_errors
def umount_command(mountpoint: str) -> None:
    """Unmount a butlerfs MOUNTPOINT, also one whose daemon died."""
    from .mounting import unmount

    unmount(mountpoint)


@click.command("demo-repo")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--visits", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--detectors", default=4, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--image-size",
    default=512,
    show_default=True,
    type=click.IntRange(min=64),
    help="Pixels on a side of each calexp.",
)
@click.option("--datastore-root", default=None, help="Datastore root URI (default: inside ROOT).")
@click.option(
    "--registry",
    default=None,
    metavar="URL",
    help="Registry database, e.g. postgresql://USER@HOST:PORT/DB (needs butlerfs[postgres] and "
    "btree_gist in DB; default: SQLite in ROOT).",
)
@click.option(
    "--namespace",
    default=None,
    help="PostgreSQL schema holding this repository's tables (default: demo_<ROOT name>_<hash>).",
)
@click.option("--force", is_flag=True, help="Replace ROOT (and the registry namespace) if it exists.")
@_user_errors
def demo_repo_command(
    root: str,
    visits: int,
    detectors: int,
    image_size: int,
    datastore_root: str | None,
    registry: str | None,
    namespace: str | None,
    force: bool,
) -> None:
    """Create a demo repository at ROOT shaped like Rubin's DP0.2 data."""
    from .demo import make_demo_repo

    try:
        summary = make_demo_repo(
            root,
            visits=visits,
            detectors=detectors,
            image_size=image_size,
            datastore_root=datastore_root,
            registry=registry,
            namespace=namespace,
            force=force,
        )
    except FileExistsError as err:
        raise UsageError(f"{root} exists and is not empty: pass --force to replace it ({err})") from None
    click.echo(f"Created demo repository {summary.root}")
    for name, count in sorted(summary.dataset_counts.items()):
        click.echo(f"  {name}: {count} datasets")
    click.echo(f"  collections: {', '.join(summary.collections)}")


@click.command("setup-repo")
@click.argument("repo")
@_user_errors
def setup_repo_command(repo: str) -> None:
    """Add the ButlerfsFile storage class and formatter to REPO's butler.yaml.

    Then any process reads butlerfs outputs (butler.get) without importing butlerfs; the wrapper
    task and butlerfs run need nothing of the repository.
    """
    from .formatter import setup_repo

    if setup_repo(repo):
        click.echo(f"{repo}: butler.yaml now defines the ButlerfsFile storage class and formatter")
    else:
        click.echo(f"{repo}: butler.yaml already defines the ButlerfsFile storage class and formatter")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


@click.group("cache")
def cache_group() -> None:
    """Inspect, clear or fill the block cache of remote (S3) artifacts."""


@cache_group.command("info")
@cache_dir_option
@_user_errors
def cache_info_command(cache_dir: str | None) -> None:
    """Show the cache's directory, entries and size."""
    from .cache import BlockCache, default_cache_dir

    info = BlockCache(cache_dir or default_cache_dir(), limit=0).info()
    click.echo(f"cache directory: {info.path}")
    click.echo(f"entries (datasets or components): {info.entries}")
    click.echo(f"size: {_human(info.bytes)}")


@cache_group.command("clear")
@cache_dir_option
@_user_errors
def cache_clear_command(cache_dir: str | None) -> None:
    """Remove every cached block (safe while mounts use the cache: they fetch again)."""
    from .cache import BlockCache, default_cache_dir

    cache = BlockCache(cache_dir or default_cache_dir(), limit=0)
    before = cache.info()
    cache.clear()
    click.echo(f"Removed {before.entries} entries ({_human(before.bytes)}) from {before.path}")


@cache_group.command("prefetch")
@click.argument("repo")
@collections_option
@dataset_type_option
@where_option
@cache_dir_option
@cache_size_option
@click.option("--fetch-concurrency", "-j", default=16, show_default=True, type=click.IntRange(min=1))
@_user_errors
def cache_prefetch_command(
    repo: str,
    collections: tuple[str, ...],
    dataset_types: tuple[str, ...],
    where: str,
    cache_dir: str | None,
    cache_size: int,
    fetch_concurrency: int,
) -> None:
    """Fetch the remote artifacts of a query into the cache, in parallel.

    Takes the same REPO, --collections, --dataset-type and --where as mount, so that
    a batch run over the mount afterwards reads only local bytes.
    """
    from .errors import FsError
    from .prefetch import prefetch

    options = MountOptions(
        repo=repo,
        mountpoint="",
        collections=collections,
        dataset_types=dataset_types,
        where=where,
        cache_dir=cache_dir,
        cache_size=cache_size,
        fetch_concurrency=fetch_concurrency,
    )
    if cache_size <= 0:
        raise UsageError("prefetch needs a cache: give a --cache-size above 0")
    bar: Any = None

    def on_plan(total: int) -> None:
        nonlocal bar
        bar = click.progressbar(length=total, label="Prefetching", show_pos=False, show_percent=True)
        bar.__enter__()

    try:
        result = prefetch(options, on_plan=on_plan, on_progress=lambda n: bar.update(n))
    except FsError as err:
        raise UsageError(f"prefetch failed: {err.strerror} (nothing is lost: run it again)") from None
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    click.echo(
        f"{result.datasets} datasets, {result.remote_artifacts} remote artifacts "
        f"({_human(result.bytes_total)}): fetched {_human(result.bytes_fetched)} "
        f"in {result.requests} requests; "
        f"{result.local_artifacts} local artifacts need no cache"
    )


# The run's defaults live in `RunOptions` (also those of the Python API, `butlerfs.run`).
_RUN_DEFAULTS = {
    name: str(value) if isinstance(value, str) else value for name, value in run_defaults().items()
}


def _choices(modes: type[enum.StrEnum]) -> click.Choice:
    return click.Choice([mode.value for mode in modes])


def run_options(params: dict[str, Any]) -> RunOptions:
    """Return the `RunOptions` of a ``run`` command line (click's parameters, one per field).

    Every option is a field of the same name, but ``--no-network``, which is ``network``
    inverted: a new option without a field (or the reverse) fails here.
    """
    values = dict(params)
    values["network"] = not values.pop("no_network")
    return RunOptions(**values)


@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("repo")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- PROGRAM [ARG]...")
@collections_option
@click.option(
    "--input",
    "-i",
    "inputs",
    multiple=True,
    metavar="NAME=DATASET_TYPE[:MODE]",
    help="An input, {NAME} in the command; the first gives the data IDs. MODE: mount (default), "
    "direct (path at rest), copy (private copy), uri (the URI string).",
)
@click.option(
    "--where",
    "-w",
    default=_RUN_DEFAULTS["where"],
    metavar="EXPR",
    help='Butler query expression constraining the first input, e.g. "visit = 733724".',
)
@click.option(
    "--output",
    "-o",
    "outputs",
    multiple=True,
    metavar="NAME=GLOB[:DATASET_TYPE]",
    help="A file the program writes (exactly one match in its working directory), stored as a "
    "dataset of the data ID (dataset type default NAME).",
)
@click.option(
    "--output-run",
    default=_RUN_DEFAULTS["output_run"],
    metavar="RUN",
    help="RUN collection receiving the outputs.",
)
@click.option(
    "--jobs",
    "-j",
    default=_RUN_DEFAULTS["jobs"],
    show_default=True,
    type=click.IntRange(min=1),
    help="Data IDs at once.",
)
@click.option(
    "--timeout",
    default=_RUN_DEFAULTS["timeout"],
    type=click.FloatRange(min=0),
    help="Seconds before a program is stopped.",
)
@click.option(
    "--kill-grace",
    default=_RUN_DEFAULTS["kill_grace"],
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds between SIGTERM and SIGKILL when stopping a program.",
)
@click.option(
    "--sandbox",
    default=_RUN_DEFAULTS["sandbox"],
    show_default=True,
    type=_choices(SandboxMode),
    help="Run programs under bubblewrap: read-only system, writable working directory only.",
)
@click.option("--no-network", is_flag=True, help="No network for the program (needs the sandbox).")
@click.option(
    "--overlay",
    default=_RUN_DEFAULTS["overlay"],
    show_default=True,
    type=_choices(OverlayMode),
    help="How the writable working directory is made; auto tries kernel, fuse, links.",
)
@click.option(
    "--transfer",
    default=_RUN_DEFAULTS["transfer"],
    show_default=True,
    type=_choices(TransferMode),
    help="How ingest stores output files.",
)
@click.option("--put", is_flag=True, help="Store outputs with butler.put through the ButlerfsFile formatter.")
@click.option("--shell", is_flag=True, help="Run the command with /bin/sh -c; substitutions are quoted.")
@click.option("--fail-fast", is_flag=True, help="Start no new data ID after one failed.")
@click.option("--rerun-failed", is_flag=True, help="Run again the data IDs that failed in a previous run.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=_RUN_DEFAULTS["workdir"],
    help="Workspaces, one per data ID (default ./butlerfs-run/<output run or timestamp>).",
)
@click.pass_context
@_user_errors
def run_command(ctx: click.Context, **params: Any) -> None:
    """Run PROGRAM once per data ID of REPO's datasets and store its outputs in the Butler.

    \b
    Placeholders in the arguments: {NAME} (an input's path), {dataId.KEY}, {workdir};
    {{ and }} are literal braces. Example:
      butlerfs run repo -c LSSTCam-imSim/defaults -i img=calexp -w "visit = 733724" \\
        -o cat=cat.fits:srcCat --output-run u/me/sex -- \\
        source-extractor '{img}[1]' -CATALOG_NAME cat.fits -CATALOG_TYPE FITS_1.0
    """  # noqa: D301 (click's \b keeps the example's lines)
    from wrapper.run import execute_plan, plan_run

    options = run_options(params)
    plan = plan_run(options)
    if sys.stderr.isatty():
        with click.progressbar(
            length=len(plan.units), label="Running", file=sys.stderr, show_pos=True, show_percent=False
        ) as bar:
            summary = execute_plan(plan, on_result=lambda result: bar.update(1))
    else:
        summary = execute_plan(plan)
    for line in summary.report():
        click.echo(line)
    if summary.interrupted:
        click.echo("Interrupted: running programs were stopped; nothing half-done was stored.", err=True)
        ctx.exit(130)
    if not summary.ok:
        ctx.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="butlerfs")
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Logging level of this command (the daemon has its own, see mount --log-level).",
)
def main(log_level: str) -> None:
    """butlerfs: a read-only POSIX view of a Rubin Butler repository."""
    _configure_logging(log_level)


main.add_command(mount_command)
main.add_command(umount_command)
main.add_command(demo_repo_command)
main.add_command(cache_group)
main.add_command(run_command)
main.add_command(setup_repo_command)


def butler_plugin_commands() -> list[click.Command]:
    """Return the commands ``butler`` gains through the ``butler.cli`` entry point."""
    # Every butler subcommand (transfer-from-graph, retrieve-artifacts...) then knows ButlerfsFile
    # on any repository; the butler command has imported daf_butler already.
    from . import formatter  # noqa: F401

    return [mount_command, umount_command, run_command]
