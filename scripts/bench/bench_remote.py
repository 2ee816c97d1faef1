"""A client/server Butler mounted through daf_butler's Butler server vs the same repository mounted directly.

Starts one ``python -m moto.server`` and one Butler server (daf_butler's own, ``uvicorn``) on
127.0.0.1, both by PID and stopped by PID, and builds a repository under
``$BUTLERFS_BENCH_DIR/remote`` whose registry is a local SQLite file and whose datastore is in
the moto server: ``--datasets`` small artifacts of one dataset type (``instrument, visit,
detector``: N/100 visits x 100 detectors) and one FITS artifact of ``--size-mib`` MiB of random
int16 pixels. The Butler server serves that repository; the direct mount reads the same
SQLite file and the same bucket. Then, each against the other in the same run, alternating:

1. listing: on a fresh mount, ``find MNT/calexp -type f -printf '%s\\n'`` (a ``stat`` of every
   file: the whole listing, datastore records included);
2. a cold sequential read of the big artifact, ``dd bs=1M``, through a fresh mount with a new,
   empty block cache (the page cache dropped first when run as root).

Target: remote within 1.3x of direct on both. Writes the ``bench:remote`` section of
``docs/BENCHMARKS.md``. ``--quick`` is a smoke run (1,000 datasets, 32 MiB, one repetition).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common as c
import psutil

sys.path.insert(0, str(c.ROOT / "tests"))
from butlerserver import ButlerServer  # noqa: E402
from s3server import MotoServer, running  # noqa: E402

SECTION = "remote"
BUCKET = "butlerfs-bench-remote"
PREFIX = "bench-remote"
RUN = "bench/remote"
INSTRUMENT = c.INSTRUMENT
SMALL = "calexp"
BIG = "bigFits"
DETECTORS = 100
STATS_XATTR = "user.butlerfs.stats"
TOKEN = "butlerfs-bench-token"
# moto keeps objects up to this size in memory: dropping the page cache does not touch them.
MOTO_ENV = {"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(4 << 30)}


# -- the repository ----------------------------------------------------------------------------


def build_repo(root: Path, n: int, big_mib: int, client: Any) -> dict[str, float]:
    """Make the repository at ``root / "repo"``; return the seconds each step took."""
    import concurrent.futures

    from lsst.daf.butler import DataCoordinate, DatasetIdGenEnum, DatasetRef, DatasetType, FileDataset
    from lsst.daf.butler.datastore.record_data import DatastoreRecordData
    from lsst.daf.butler.datastore.stored_file_info import StoredFileInfo

    from butlerfs.formatter import FileArtifactFormatter

    steps: dict[str, float] = {}
    t = time.perf_counter()

    def step(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        steps[name] = now - t
        t = now
        print(f"  {name}: {steps[name]:.1f} s", flush=True)

    c.remove_tree(root)
    root.mkdir(parents=True)
    repo = root / "repo"
    butler = c.new_repo(repo, datastore_root=f"s3://{BUCKET}/{PREFIX}/")
    registry = butler.registry
    registry.insertDimensionData("physical_filter", dict(instrument=INSTRUMENT, name="r_bench", band="r"))
    registry.insertDimensionData("day_obs", dict(instrument=INSTRUMENT, id=20240101))
    registry.insertDimensionData(
        "detector", *[dict(instrument=INSTRUMENT, id=d, full_name=f"D{d:03d}") for d in range(DETECTORS)]
    )
    visits = [100_000 + v for v in range((n + DETECTORS - 1) // DETECTORS)]
    registry.insertDimensionData("visit", *[
        dict(instrument=INSTRUMENT, id=v, name=str(v), physical_filter="r_bench", day_obs=20240101)
        for v in visits])
    registry.insertDimensionData("visit_detector_region", *[
        dict(instrument=INSTRUMENT, visit=v, detector=d) for v in visits for d in range(DETECTORS)])
    universe = butler.dimensions
    small = DatasetType(SMALL, ("instrument", "visit", "detector"), "ButlerfsFile", universe=universe)
    big = DatasetType(BIG, ("instrument",), "ButlerfsFile", universe=universe)
    for dataset_type in (small, big):
        registry.registerDatasetType(dataset_type)
    registry.registerRun(RUN)
    step("dimension records")

    # Small objects of varying size, uploaded under the datastore root, recorded with
    # relative paths, as a normal repository records them.
    data_ids = [(v, d) for v in visits for d in range(DETECTORS)][:n]
    keys = [f"{PREFIX}/files/visit_{v}/calexp_{v}_{d}.fits" for v, d in data_ids]

    def put(item: tuple[str, tuple[int, int]]) -> None:
        key, (v, d) = item
        body = b"%06d %02d\n" % (v, d) + b"\0" * (2876 + 7 * d)
        client.put_object(Bucket=BUCKET, Key=key, Body=body)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, zip(keys, data_ids, strict=True)))
    step(f"{n} objects uploaded")
    # The records go in through the datastore's own record import (sizes known): ingest would
    # ask the bucket for each object's size again.
    datastore = butler._datastore
    refs = registry.insertDatasets(
        small, [dict(instrument=INSTRUMENT, visit=v, detector=d) for v, d in data_ids], run=RUN,
        idGenerationMode=DatasetIdGenEnum.DATAID_TYPE_RUN)
    def record(key: str, detector: int) -> StoredFileInfo:
        return StoredFileInfo(formatter=FileArtifactFormatter, path=key.removeprefix(f"{PREFIX}/"),
                              storageClass=small.storageClass, component=None, checksum=None,
                              file_size=2886 + 7 * detector)

    records = {ref.id: {datastore._table.name: [record(key, d)]}
               for ref, key, (v, d) in zip(refs, keys, data_ids, strict=True)}
    with butler.transaction():
        datastore.import_records({datastore.name: DatastoreRecordData(records=records)})
    step("datasets and records")
    local = root / "big.fits"
    write_fits(local, big_mib)
    ref = DatasetRef(big, DataCoordinate.standardize(instrument=INSTRUMENT, universe=universe), run=RUN,
                     id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN)
    butler.ingest(FileDataset(path=str(local), refs=[ref], formatter=FileArtifactFormatter), transfer="move")
    step(f"{big_mib} MiB artifact")
    butler.close()
    return steps


def write_fits(path: Path, mib: int) -> None:
    """Write an int16 FITS image of ``mib`` MiB of random pixels."""
    from astropy.io import fits

    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = 16
    header["NAXIS"] = 2
    header["NAXIS1"] = 8192
    header["NAXIS2"] = 64 * mib
    with open(path, "wb") as stream:
        stream.write(header.tostring().encode())
        c.write_random(stream, mib)
        stream.write(b"\0" * ((-mib * c.MIB) % 2880))


# -- measuring ---------------------------------------------------------------------------------


def stats(mountpoint: str) -> dict[str, int]:
    return json.loads(os.getxattr(mountpoint, STATS_XATTR))


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path, moto: MotoServer, server: ButlerServer) -> None:
        self.args = args
        self.root = root
        self.repos = {"direct": str(root / "repo"), "remote": server.url("bench")}
        self.procs = {"moto": psutil.Process(moto.process.pid), "server": psutil.Process(server.process.pid)}
        self.mountpoint = c.BENCH_DIR / "mnt-remote"
        self.log = root / "daemon.log"
        self.mounts = 0
        self.server_cpu: dict[str, float] = {}
        """Butler server CPU seconds of each call of `breakdown`."""

    @contextlib.contextmanager
    def mounted(self, kind: str, dataset_type: str) -> Iterator[tuple[Any, float]]:
        """A fresh mount with a new, empty cache; yield it and the seconds ``mount`` took."""
        import butlerfs

        cache = self.root / "cache"
        c.remove_tree(cache)
        c.fresh_dir(self.mountpoint)
        start = time.perf_counter()
        with butlerfs.mount(self.repos[kind], str(self.mountpoint), collections=[RUN],
                            dataset_types=[dataset_type], cache_dir=str(cache), log_file=str(self.log)) as m:
            self.mounts += 1
            yield m, time.perf_counter() - start

    def listing(self, kind: str) -> dict[str, float]:
        with self.mounted(kind, SMALL) as (m, mount_s):
            daemon = psutil.Process(m.pid)
            before = {"daemon": cpu(daemon), **{k: cpu(p) for k, p in self.procs.items()}}
            cmd = ["find", str(Path(m.mountpoint, SMALL)), "-type", "f", "-printf", "%s\\n"]
            start = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            elapsed = time.perf_counter() - start
            count = len(out.split())
            if count != self.args.datasets:
                raise RuntimeError(f"{kind} mount listed {count} files, not {self.args.datasets}")
            used = {"daemon": cpu(daemon) - before["daemon"],
                    **{k: cpu(p) - before[k] for k, p in self.procs.items()}}
            requests = stats(m.mountpoint)["requests"]
        return {"seconds": elapsed, "mount": mount_s, "requests": requests, **used}

    def read(self, kind: str) -> dict[str, float]:
        if c.can_drop_caches():
            c.drop_caches()
        with self.mounted(kind, BIG) as (m, mount_s):
            (path,) = [os.path.join(d, f) for d, _, fs in os.walk(Path(m.mountpoint, BIG)) for f in fs]
            size = os.path.getsize(path)
            daemon = psutil.Process(m.pid)
            before = {"daemon": cpu(daemon), **{k: cpu(p) for k, p in self.procs.items()}}
            elapsed, _ = c.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"])
            used = {"daemon": cpu(daemon) - before["daemon"],
                    **{k: cpu(p) - before[k] for k, p in self.procs.items()}}
            counters = stats(m.mountpoint)
        if counters["bytes_fetched"] != size:
            raise RuntimeError(f"{kind}: fetched {counters['bytes_fetched']} bytes of {size}")
        return {"seconds": elapsed, "mount": mount_s, "bytes": size, "requests": counters["requests"], **used}


def failed(failures: list[str]) -> str:
    """A sentence on the reads that failed (they are left out of the medians)."""
    if not failures:
        return ""
    lines = "; ".join(f.splitlines()[0][:300] for f in failures)
    return f" {len(failures)} read(s) failed and are left out of the medians: {lines}."


def general_query(butler: Any, fields: Any) -> int:
    """The query `RepoIndex.datasets` makes for the whole dataset type, with ``fields``."""
    with butler.query() as query:
        results = query.join_dataset_search(SMALL, [RUN]).general(
            ["instrument", "visit", "detector"], dataset_fields={SMALL: fields}, find_first=True)
        return len(list(results))


def breakdown(bench: Bench) -> list[list[str]]:
    """Where a listing's time goes, in this process: client and Butler server CPU of each part.

    ``RepoIndex.datasets`` of the whole dataset type (the query and the records), the query
    alone with and without ``ingest_date`` (the files' mtime), and the records alone.
    """
    from butlerfs.registry import RepoIndex

    server = bench.procs["server"]
    rows = []
    bench.server_cpu = {}

    def measure(label: str, kind: str, call: Any, *args: Any) -> Any:
        client0, server0, start = time.process_time(), cpu(server), time.perf_counter()
        result = call(*args)
        server_s = cpu(server) - server0
        client_s = time.process_time() - client0
        rows.append([label, kind, c.seconds(time.perf_counter() - start), f"{client_s:.2f} s",
                     f"{server_s:.2f} s" if kind == "remote" else "-"])
        if kind == "remote":
            bench.server_cpu[label] = server_s
        return result

    for kind in ("direct", "remote"):
        index = RepoIndex(bench.repos[kind], [RUN], [SMALL])
        index.datasets(SMALL, {})  # warm: the dataset type and dimension caches
        entries = measure("`RepoIndex.datasets` (query + records)", kind, index.datasets, SMALL, {})
        for fields, label in (({"dataset_id", "run", "ingest_date"}, "query with `ingest_date`"),
                              ({"dataset_id", "run"}, "query without `ingest_date`")):
            measure(label, kind, general_query, index._butler, fields)
        measure("datastore records alone", kind, index.datastore.artifacts, [entry.id for entry in entries])
        index.close()
    return rows


def explain(server_cpu: dict[str, float], results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    """What limits the remote listing, from the numbers of this run."""
    listing = results["listing"]
    direct = med(listing["direct"], "daemon")
    remote = med(listing["remote"], "daemon") + med(listing["remote"], "server")
    with_date = server_cpu.get("query with `ingest_date`", 0.0)
    without = server_cpu.get("query without `ingest_date`", 0.0)
    records = server_cpu.get("datastore records alone", 0.0)
    return (
        f"*What the remote listing costs.* On two cores, the Butler server's CPU adds to the daemon's: "
        f"a remote listing took {remote:.1f} s of CPU (daemon and server) where the direct one took "
        f"{direct:.1f} s (daemon), medians of the mounts above. Most of the server's share is the "
        f"datasets' `ingest_date` (the files' mtime): the server spent {with_date:.2f} s on the query "
        f"with it and {without:.2f} s without it, each row's date becoming an astropy `Time` and back "
        f"before it is sent; the file-transfer records (sizes, paths) took {records:.2f} s of its CPU. "
        "The remote daemon itself does less than the direct one (no SQL, no record rows). On an "
        "idle machine with more cores than one server, the two overlap only partly: the records "
        "are asked for once the query has answered."
    )


def med(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def best(runs: list[dict[str, float]], key: str) -> float:
    return min(r[key] for r in runs)


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=int, default=10_000)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="seconds to wait for the load average to fall below 1 before measuring")
    parser.add_argument("--quick", action="store_true", help="1,000 datasets, 32 MiB, one repetition")
    parser.add_argument("--no-docs", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.size_mib, args.reps = 1000, 32, 1
    command = "python scripts/bench/bench_remote.py " + shlex.join(sys.argv[1:])
    started = time.perf_counter()
    root = c.BENCH_DIR / "remote"
    moto = MotoServer(env=MOTO_ENV).start()
    server = None
    with running(moto):
        os.environ.update(moto.environ())
        os.environ.pop("AWS_PROFILE", None)
        os.environ["BUTLER_RUBIN_ACCESS_TOKEN"] = TOKEN
        client = moto.client()
        client.create_bucket(Bucket=BUCKET)
        print(f"Building {args.datasets} datasets and a {args.size_mib} MiB artifact in {root}", flush=True)
        steps = build_repo(root, args.datasets, args.size_mib, client)
        config = {"bench": str(root / "repo" / "butler.yaml")}
        server = ButlerServer(config, moto.environ(), root / "server.log")
        try:
            server.start("bench")
            c.wait_for_quiet(args.wait_idle)
            load_start = c.load_average()
            bench = Bench(args, root, moto, server)
            failures: list[str] = []
            results: dict[str, dict[str, list[dict[str, float]]]] = {
                "listing": {"direct": [], "remote": []}, "read": {"direct": [], "remote": []}}
            for rep in range(args.reps):
                order = ("direct", "remote") if rep % 2 == 0 else ("remote", "direct")
                for kind in order:
                    results["listing"][kind].append(bench.listing(kind))
                    print(f"  listing {kind}: {results['listing'][kind][-1]['seconds']:.2f} s", flush=True)
                for kind in order:
                    try:
                        results["read"][kind].append(bench.read(kind))
                    except RuntimeError as err:  # EIO: a read that kept failing (an overloaded server)
                        failures.append(f"read {kind}: {err}")
                        print(f"  read {kind} FAILED: {err}", flush=True)
                        continue
                    print(f"  read {kind}: {results['read'][kind][-1]['seconds']:.2f} s", flush=True)
            parts = breakdown(bench)
            parts_text = explain(bench.server_cpu, results)
        finally:
            server.stop()
    body = report(args, command, steps, results, load_start, bench.mounts, time.perf_counter() - started,
                  failures, parts, parts_text)
    c.publish(SECTION, body, args.no_docs)


def report(args: argparse.Namespace, command: str, steps: dict[str, float],
           results: dict[str, dict[str, list[dict[str, float]]]], load_start: str, mounts: int,
           total: float, failures: list[str], parts: list[list[str]], parts_text: str) -> str:
    listing, read = results["listing"], results["read"]
    ratios = {what: med(results[what]["remote"], "seconds") / med(results[what]["direct"], "seconds")
              for what in ("listing", "read")}
    rows = []
    for what, runs in (("listing", listing), ("read", read)):
        for kind in ("direct", "remote"):
            r = runs[kind]
            throughput = ""
            if what == "read":
                throughput = f"{r[0]['bytes'] / med(r, 'seconds') / 1e6:.0f}"
            rows.append([
                what, kind, f"{c.seconds(med(r, 'seconds'))} ({c.seconds(best(r, 'seconds'))})", throughput,
                c.ratio(ratios[what]) if kind == "remote" else "",
                f"{med(r, 'requests'):.0f}", f"{med(r, 'daemon'):.2f} s", f"{med(r, 'server'):.2f} s",
                f"{med(r, 'moto'):.2f} s", c.seconds(med(r, "mount")),
            ])
    bests = {what: best(results[what]["remote"], "seconds") / best(results[what]["direct"], "seconds")
             for what in ("listing", "read")}
    verdict = "; ".join(
        f"{what} {ratios[what]:.2f}x of direct (medians; best times {bests[what]:.2f}x), "
        f"{'meets' if ratios[what] <= 1.3 else 'misses'} the target <= 1.3x"
        for what in ("listing", "read")
    )
    build = ", ".join(f"{name} {value:.0f} s" for name, value in steps.items())
    cold = "after `sync; echo 3 > /proc/sys/vm/drop_caches`" if c.can_drop_caches() else (
        "without dropping the page cache (not root)")
    return f"""## A client/server Butler vs the same repository mounted directly (`bench_remote.py`)

*{c.today()}*

**Question.** How much does mounting a repository through daf_butler's Butler server (as Rubin
Science Platform users reach it: `RemoteButler`, artifacts read through URLs the server signs)
cost, against mounting the same repository directly (its SQLite registry and S3 bucket)?
(1) listing {args.datasets:,} datasets (a `stat` of every file) and (2) a cold sequential read of a
{args.size_mib} MiB artifact; target: remote within 1.3x of direct on both.

**Command.** `{command}`{' (run as root)' if os.geteuid() == 0 else ''}. One `python -m moto.server`
(objects in memory) holds the datastore `s3://{BUCKET}/{PREFIX}/`; the registry is a local SQLite
file; one Butler server (`uvicorn --factory lsst.daf.butler.remote_butler.server:create_app`,
`DAF_BUTLER_SERVER_AUTHENTICATION=rubin_science_platform`, Gafaelfawr disabled) serves the
repository on 127.0.0.1; both processes started and stopped by PID. The direct mount reads the
SQLite file and the bucket (boto3); the remote mount asks the server for everything (queries,
file-transfer records, signed URLs) and reads the bucket through the signed URLs (httpx2), with the
same fetcher, read-ahead and block cache. Built in {build}: {args.datasets:,} objects of 2.9-3.6 KB
(`{SMALL}`, instrument/visit/detector, {DETECTORS} detectors per visit) uploaded and ingested in
place, and one FITS image of random int16 pixels (`{BIG}`). (1): `find MNT/{SMALL} -type f -printf
'%s\\n'` on a fresh mount, timed from outside; (2): `dd if=FILE of=/dev/null bs=1M` on a fresh mount
with a new, empty cache directory, {cold}; every read fetched exactly the artifact's bytes. Direct
and remote alternate, the order swapped every repetition; {args.reps} repetitions, median (best).
CPU: user+system seconds of the mount's daemon, the Butler server and moto during the
measurement. Requests: the daemon's HTTP requests (stats xattr; for the remote mount, the
signed-URL requests to the server count too, the queries do not). "mount" is `butlerfs.mount()`
until the mount answers (opening the repository through the server, for remote). {mounts} mounts in all.

**Machine.**
{chr(10).join(c.machine_facts(c.BENCH_DIR))}
{c.load_line(load_start)}

{c.table(["measure", "mount", "time median (best)", "MB/s", "ratio remote/direct", "requests",
          "daemon CPU", "Butler server CPU", "moto CPU", "mount"], rows)}

Where a listing's time goes, measured in this process after the mounts (one call each, the
caches warm; client CPU is this process's, server CPU the Butler server's):

{c.table(["call", "Butler", "wall", "client CPU", "Butler server CPU"], parts)}

{parts_text}

**Conclusion.** {verdict}.{c.contention_note(load_start)}{failed(failures)}
Total benchmark time {total:.0f} s.
"""


if __name__ == "__main__":
    main()
