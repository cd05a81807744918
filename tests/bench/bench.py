#!/usr/bin/env python3
"""Benchmark guix-image against "the floor" on a store made from this machine's Python.

The store is built once under --work from copies of the interpreter's own
standard library and site-packages (one store item per package, repeated
under new names until the size is reached), with a config that layers it
the way `guix pack --max-layers` does: largest items first, one per layer,
the rest in the last layer. Like a real store it has a database that
registers each item's NAR hash.

Every command runs --runs times, interleaved, and the table reports medians,
each as a ratio to the floor measured in the same run:

    floor        tar -cf - PATHS | openssl dgst -sha256   (one read, one hash)
    cold         guix-image build, empty layer cache, to a pipe
    warm         guix-image build, layer digests cached, to a pipe
    --reference  any 'COMMAND {config}' given, e.g. the seed script
    --baseline   another guix-image (say, the code before a change), cold and
                 warm, its readers and its start-up, in the same rounds

With --push, `push CONFIG` into a local docker-registry (started here), against
the peer route `build CONFIG -o x.tar && skopeo copy docker-archive:x.tar docker://`:
a first push (cold layer cache, empty registry), a push with nothing changed,
and a push after one leaf store item changed.

With --oci, the OCI output of the OCI issue, against its own floors:

    pigz floor   tar -cf - PATHS | pigz -p 2 -6 | openssl dgst -sha256
    zstd floor   tar -cf - PATHS | zstd -3 -T2 | openssl dgst -sha256
    oci zstd     build --format oci-archive --compress zstd, cold, to a pipe
    oci gzip     build --format oci-archive (gzip), cold, and warm (cache)

and the archives' sizes beside `zstd -3` and `gzip -6` of the same tar.

Peak RSS is the process's maximum resident set size (getrusage). The startup
rows are absolute: `guix-image --help` and one shell-completion request.
The package's bytecode is compiled first, as `pip install` does.

    python3 tests/bench/bench.py                  # the 1.2 GB store
    python3 tests/bench/bench.py --size small     # about 100 MB, under a minute
    python3 tests/bench/bench.py --baseline /tmp/old/bin/guix-image   # before/after
    python3 tests/bench/bench.py --oci --runs 5   # the OCI formats and compression
    python3 tests/bench/bench.py --push --runs 5  # push, into a local docker-registry
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import importlib.util
import io
import json
import os
import platform
import shutil
import sqlite3
import stat
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parent.parent
SIZES = {"small": (100 << 20, 3_000), "large": (1200 << 20, 35_000), "huge": (2 << 30, 60_000)}
MAX_LAYERS = 40


@dataclass
class Measurement:
    name: str
    seconds: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def package_sources() -> list[Path]:
    """Top-level packages and modules of the interpreter's library: many small files."""
    roots = {Path(sysconfig.get_paths()[key]) for key in ("stdlib", "purelib", "platlib")}
    items = []
    for root in sorted(roots):
        for child in sorted(root.iterdir()):
            if child.name in ("site-packages", "__pycache__") or child.is_symlink():
                continue
            items.append(child)
    return items


def binary_sources(minimum: int = 1 << 20) -> list[Path]:
    """Large files under the interpreter's prefix (libpython, extension modules)."""
    found = []
    for dirpath, _, filenames in os.walk(sys.base_prefix):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink() and path.stat().st_size >= minimum:
                found.append(path)
    return sorted(found)


def tree_size(path: Path) -> tuple[int, int]:
    if path.is_file():
        return path.stat().st_size, 1
    total = files = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                total += os.lstat(full).st_size
            files += 1
    return total, files


def item_path(store: Path, name: str, copy: int) -> Path:
    digest = hashlib.sha256(f"{name}-{copy}".encode()).hexdigest()[:32]
    return store / f"{digest}-{name.replace('.', '-')}-{copy}"


def make_store(work: Path, size: str) -> Path:
    """The store and its config, made once per size and reused.

    Like a real closure: package items with many small files (documentation,
    libraries) until the file count is reached, then items of large binaries
    until the size is reached.
    """
    target_bytes, target_files = SIZES[size]
    base = work / size
    config_path = base / "config.json"
    if config_path.exists():
        return config_path
    if base.exists():
        shutil.rmtree(base)
    store = base / "gnu" / "store"
    store.mkdir(parents=True)
    items: list[tuple[int, str]] = []
    total = files = copy = 0
    packages = [(s, *tree_size(s)) for s in package_sources()]
    packages = [p for p in packages if 0 < p[1] <= target_bytes // 20]
    while files < target_files:
        for source, source_bytes, source_files in packages:
            if files >= target_files:
                break
            item = item_path(store, source.name, copy)
            if source.is_dir():
                shutil.copytree(source, item, symlinks=True)
            else:
                shutil.copy2(source, item)
            items.append((source_bytes, str(item)))
            total += source_bytes
            files += source_files
        copy += 1
    binaries = binary_sources()
    copy = 0
    while total < target_bytes:
        item = item_path(store, "binaries", copy)
        item_bytes = 0
        for number, source in enumerate(binaries):
            if total + item_bytes >= target_bytes or item_bytes >= 200 << 20:
                break
            (item / "lib").mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, item / "lib" / f"{number:03d}-{source.name}")
            item_bytes += source.stat().st_size
            files += 1
        items.append((item_bytes, str(item)))
        total += item_bytes
        copy += 1
    items.sort(key=lambda x: (-x[0], x[1]))
    layers = [[path] for _, path in items[: MAX_LAYERS - 2]]
    layers.append([path for _, path in items[MAX_LAYERS - 2 :]])
    customisation = base / "customisation"
    customisation.mkdir()
    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("etc/motd")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"bench\n"))
    (customisation / "layer.tar").write_bytes(layer_tar.getvalue())
    (customisation / "checksum").write_text(hashlib.sha256(layer_tar.getvalue()).hexdigest())
    config = {
        "architecture": "amd64",
        "config": {"Env": ["PATH=/bin"]},
        "created": "1970-01-01T00:00:01Z",
        "repo_tag": f"bench-{size}:latest",
        "store_dir": str(store),
        "from_image": None,
        "store_layers": layers,
        "customisation_layer": str(customisation),
    }
    config_path.write_text(json.dumps(config, indent=1))
    (base / "SUMMARY").write_text(f"{total} bytes, {files} files, {len(items)} store items\n")
    return config_path


def database_path(config: Path) -> Path:
    """Where a Guix store's database is for the store under `config`'s directory."""
    return config.parent / "var" / "guix" / "db" / "db.sqlite"


def register_store(config: Path) -> None:
    """Give the store its database, as a real one has: every item's NAR hash."""
    database = database_path(config)
    if database.exists():
        return
    paths = [p for layer in json.loads(config.read_text())["store_layers"] for p in layer]
    database.parent.mkdir(parents=True, exist_ok=True)
    temporary = database.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)
    connection = sqlite3.connect(temporary)
    with connection:
        connection.execute(
            "CREATE TABLE ValidPaths (id integer primary key autoincrement,"
            " path text unique not null, hash text not null,"
            " registrationTime integer not null, deriver text, narSize integer)"
        )
        for path in paths:
            digest, size = nar_hash(path)
            connection.execute(
                "INSERT INTO ValidPaths (path, hash, registrationTime, narSize)"
                " VALUES (?, ?, 1, ?)",
                (path, f"sha256:{digest}", size),
            )
    connection.close()
    temporary.rename(database)


def nar_hash(path: str) -> tuple[str, int]:
    """SHA-256 and size of the Nix archive (NAR) serialisation of `path`."""
    digest = hashlib.sha256()
    size = 0

    def put(data: bytes) -> None:
        nonlocal size
        digest.update(len(data).to_bytes(8, "little") + data + bytes(-len(data) % 8))
        size += 8 + len(data) + -len(data) % 8

    def node(disk: str) -> None:
        nonlocal size
        st = os.lstat(disk)
        put(b"(")
        put(b"type")
        if stat.S_ISLNK(st.st_mode):
            put(b"symlink")
            put(b"target")
            put(os.fsencode(os.readlink(disk)))
        elif stat.S_ISDIR(st.st_mode):
            put(b"directory")
            for name in sorted(os.listdir(disk), key=os.fsencode):
                for token in (b"entry", b"(", b"name", os.fsencode(name), b"node"):
                    put(token)
                node(os.path.join(disk, name))
                put(b")")
        else:
            put(b"regular")
            if st.st_mode & 0o100:
                put(b"executable")
                put(b"")
            put(b"contents")
            digest.update(st.st_size.to_bytes(8, "little"))
            with open(disk, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            digest.update(bytes(-st.st_size % 8))
            size += 8 + st.st_size + -st.st_size % 8
        put(b")")

    put(b"nix-archive-1")
    node(path)
    return digest.hexdigest(), size


def run_timed(commands: list[list[str]], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run a pipeline of commands; wall seconds and the first command's peak RSS (KiB)."""
    start = time.perf_counter()
    processes: list[subprocess.Popen[bytes]] = []
    stdin = None
    for i, command in enumerate(commands):
        last = i == len(commands) - 1
        process = subprocess.Popen(
            command,
            stdin=stdin,
            stdout=subprocess.DEVNULL if last else subprocess.PIPE,
            env=env,
        )
        if stdin is not None:
            stdin.close()
        stdin = process.stdout
        processes.append(process)
    rss = 0
    for i, process in enumerate(processes):
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise SystemExit(f"{commands[i]} failed with status {process.returncode}")
        if i == 0:
            rss = usage.ru_maxrss
    return time.perf_counter() - start, rss


def guix_image_command() -> list[str]:
    script = Path(sysconfig.get_path("scripts")) / "guix-image"
    return [str(script)] if script.exists() else [sys.executable, "-m", "guix_image"]


def precompile_guix_image() -> None:
    """Compile the measured package's bytecode, as `pip install` does.

    An editable install in an environment with PYTHONDONTWRITEBYTECODE set
    (this machine's) would otherwise compile every module on every run.
    """
    spec = importlib.util.find_spec("guix_image")
    if spec is not None and spec.origin is not None:
        compileall.compile_dir(Path(spec.origin).parent, quiet=1)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    import ssl

    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB; {platform.platform()}; "
        f"Python {platform.python_version()}; {ssl.OPENSSL_VERSION}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "guix-image-bench"
    )
    parser.add_argument("--reference", action="append", default=[], metavar="'COMMAND {config}'")
    parser.add_argument(
        "--baseline",
        metavar="GUIX_IMAGE",
        help="another guix-image executable to measure beside this one, interleaved",
    )
    parser.add_argument("--record", type=Path, help="write the table to this Markdown file")
    parser.add_argument("--oci", action="store_true", help="measure the OCI output instead")
    parser.add_argument("--push", action="store_true", help="measure push instead")
    args = parser.parse_args()

    config = make_store(args.work, args.size)
    register_store(config)
    document = json.loads(config.read_text())
    paths = [p for layer in document["store_layers"] for p in layer]
    summary = (config.parent / "SUMMARY").read_text().strip()
    print(f"store: {summary} in {len(document['store_layers'])} + 1 layers", file=sys.stderr)

    guix_image = guix_image_command()
    precompile_guix_image()
    if args.oci:
        bench_oci(args, config, paths, guix_image, summary)
        return
    if args.push:
        bench_push(args, config, guix_image, summary)
        return
    cache_home = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    warm_env = {**os.environ, "XDG_CACHE_HOME": str(cache_home / "warm")}
    build = [*guix_image, "build", "-q", str(config)]
    run_timed([build, ["cat"]], warm_env)  # fills the warm cache, and the page cache

    cases: dict[str, tuple[list[list[str]], dict[str, str] | None]] = {
        "floor": (
            [
                ["tar", "-C", "/", "-cf", "-", *(p.lstrip("/") for p in paths)],
                ["openssl", "dgst", "-sha256"],
            ],
            None,
        ),
        "guix-image cold": ([build, ["cat"]], None),
        "guix-image warm": ([build, ["cat"]], warm_env),
        "guix-image --no-cache": ([[*build, "--no-cache"], ["cat"]], None),
    }
    for reference in args.reference:
        cases[f"reference: {reference}"] = (
            [["sh", "-c", reference.format(config=config)], ["cat"]],
            None,
        )
    baseline_build = [args.baseline, "build", "-q", str(config)] if args.baseline else []
    baseline_warm_env = {**os.environ, "XDG_CACHE_HOME": str(cache_home / "baseline-warm")}
    if args.baseline:
        run_timed([baseline_build, ["cat"]], baseline_warm_env)
        cases["baseline cold"] = ([baseline_build, ["cat"]], None)
        cases["baseline warm"] = ([baseline_build, ["cat"]], baseline_warm_env)

    results = {name: Measurement(name) for name in cases}
    for run in range(args.runs):
        for name, (commands, case_env) in cases.items():
            env = case_env
            if name in ("guix-image cold", "baseline cold"):  # an empty cache every time
                env = {**os.environ, "XDG_CACHE_HOME": str(cache_home / f"{name}-{run}")}
            seconds, rss = run_timed(commands, env)
            results[name].seconds.append(seconds)
            results[name].rss_kb.append(rss)
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)

    archive = cache_home / "image.tar"
    run_timed([[*build, "-o", str(archive)]], warm_env)
    readers = {
        "openssl dgst -sha256 ARCHIVE": [["openssl", "dgst", "-sha256", str(archive)]],
        "guix-image inspect ARCHIVE": [[*guix_image, "inspect", "--json", str(archive)]],
        "guix-image verify ARCHIVE": [[*guix_image, "verify", str(archive)]],
    }
    if args.baseline:
        readers["baseline inspect ARCHIVE"] = [[args.baseline, "inspect", "--json", str(archive)]]
        readers["baseline verify ARCHIVE"] = [[args.baseline, "verify", str(archive)]]
    reader_results = {name: Measurement(name) for name in readers}
    for _ in range(args.runs):
        for name, commands in readers.items():
            seconds, rss = run_timed(commands)
            reader_results[name].seconds.append(seconds)
            reader_results[name].rss_kb.append(rss)

    startup = {
        "guix-image --help": ([[*guix_image, "--help"]], None),
        "completion request": (
            [guix_image],
            {
                **os.environ,
                "_GUIX_IMAGE_COMPLETE": "bash_complete",
                "COMP_WORDS": "guix-image bu",
                "COMP_CWORD": "1",
            },
        ),
        "completion of --image in ARCHIVE": (
            [guix_image],
            {
                **os.environ,
                "_GUIX_IMAGE_COMPLETE": "bash_complete",
                "COMP_WORDS": f"guix-image inspect {archive} --image ",
                "COMP_CWORD": "4",
            },
        ),
    }
    if args.baseline:
        startup["baseline --help"] = ([[args.baseline, "--help"]], None)
    startup_results = {name: Measurement(name) for name in startup}
    for _ in range(max(10, args.runs)):
        for name, (commands, env) in startup.items():
            seconds, rss = run_timed(commands, env)
            startup_results[name].seconds.append(seconds)
            startup_results[name].rss_kb.append(rss)
    shutil.rmtree(cache_home, ignore_errors=True)
    floor = results["floor"].median
    lines = [
        f"### {args.size}: {summary}",
        "",
        f"{args.runs} runs, medians; {machine()}."
        + (f" Baseline: {args.baseline}." if args.baseline else ""),
        "",
        "| command | median s | x floor | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    for measurement in results.values():
        lines.append(
            f"| {measurement.name} | {measurement.median:.3f} | {measurement.median / floor:.2f} "
            f"| {max(measurement.rss_kb) / 1024:.0f} |"
        )
    digest = reader_results["openssl dgst -sha256 ARCHIVE"].median
    for measurement in reader_results.values():
        rss = max(measurement.rss_kb) / 1024
        ratio = measurement.median / digest
        lines.append(
            f"| {measurement.name} | {measurement.median:.3f} | ({ratio:.2f} x dgst) | {rss:.0f} |"
        )
    for measurement in startup_results.values():
        rss = max(measurement.rss_kb) / 1024
        lines.append(f"| {measurement.name} | {measurement.median:.3f} | | {rss:.0f} |")
    lines += ["", *check_targets(results, startup_results, reader_results)]
    table = "\n".join(lines)
    print(table)
    if args.record:
        with args.record.open("a") as record:
            record.write(table + "\n\n")


def bench_oci(
    args: argparse.Namespace, config: Path, paths: list[str], guix_image: list[str], summary: str
) -> None:
    """The OCI issue's targets: cold zstd and gzip builds against zstd and pigz, a
    warm build against the plain floor, sizes against zstd -3 and gzip -6."""
    tar = ["tar", "-C", "/", "-cf", "-", *(p.lstrip("/") for p in paths)]
    digest = ["openssl", "dgst", "-sha256"]
    cache_home = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    warm_env = {**os.environ, "XDG_CACHE_HOME": str(cache_home / "warm")}
    build = [*guix_image, "build", "-q", str(config), "--format", "oci-archive"]
    run_timed([build, ["cat"]], warm_env)  # fills the warm cache, and the page cache
    cases: dict[str, tuple[list[list[str]], dict[str, str] | None]] = {
        "floor": ([tar, digest], None),
        "pigz floor": ([tar, ["pigz", "-p", "2", "-6"], digest], None),
        "zstd floor": ([tar, ["zstd", "-q", "-3", "-T2"], digest], None),
        "oci zstd cold": ([[*build, "--compress", "zstd"], ["cat"]], None),
        "oci gzip cold": ([build, ["cat"]], None),
        "oci gzip warm": ([build, ["cat"]], warm_env),
    }
    results = {name: Measurement(name) for name in cases}
    for run in range(args.runs):
        for name, (commands, case_env) in cases.items():
            env = case_env
            if name.endswith("cold"):
                env = {**os.environ, "XDG_CACHE_HOME": str(cache_home / f"{name}-{run}")}
            seconds, rss = run_timed(commands, env)
            results[name].seconds.append(seconds)
            results[name].rss_kb.append(rss)
            if name.endswith("cold"):
                shutil.rmtree(cache_home / f"{name}-{run}", ignore_errors=True)
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    sizes = {
        "zstd -3": compressed_size([tar, ["zstd", "-q", "-3", "-T2"]]),
        "gzip -6": compressed_size([tar, ["pigz", "-p", "2", "-6"]]),
        "oci zstd": compressed_size([[*build, "--compress", "zstd", "--no-cache"]]),
        "oci gzip": compressed_size([[*build, "--no-cache"]]),
    }
    shutil.rmtree(cache_home, ignore_errors=True)
    floors = {name: results[name].median for name in ("floor", "pigz floor", "zstd floor")}
    lines = [
        f"### {args.size}, OCI output: {summary}",
        "",
        f"{args.runs} runs, medians; {machine()}.",
        "",
        "| command | median s | x floor | x pigz floor | x zstd floor | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for m in results.values():
        ratios = " | ".join(f"{m.median / floors[f]:.2f}" for f in floors)
        lines.append(f"| {m.name} | {m.median:.3f} | {ratios} | {max(m.rss_kb) / 1024:.0f} |")
    lines += ["", "| output | bytes |", "|---|---|"]
    lines += [f"| {name} | {size} |" for name, size in sizes.items()]
    checks = [
        (
            "cold oci zstd <= 1.0 x zstd floor",
            results["oci zstd cold"].median / floors["zstd floor"],
            1.0,
        ),
        (
            "cold oci gzip <= 0.35 x pigz floor",
            results["oci gzip cold"].median / floors["pigz floor"],
            0.35,
        ),
        ("warm oci gzip <= 1.0 x floor", results["oci gzip warm"].median / floors["floor"], 1.0),
        ("oci zstd size <= 1.03 x zstd -3", sizes["oci zstd"] / sizes["zstd -3"], 1.03),
        ("oci gzip size <= 1.15 x gzip -6", sizes["oci gzip"] / sizes["gzip -6"], 1.15),
        (
            "peak RSS <= 100 MiB",
            max(max(m.rss_kb) for n, m in results.items() if n.startswith("oci")) / 1024,
            100,
        ),
    ]
    report(lines, checks, args.record)


def bench_push(args: argparse.Namespace, config: Path, guix_image: list[str], summary: str) -> None:
    """The push issue's targets, each run into a registry of its own."""
    sys.path.insert(0, str(TOP))
    from tests.support.registry import running_registry

    # One leaf changed, as a rebuild changes it: a new store item in its place
    # (a store item is never edited), in the last layer, with many others.
    document = json.loads(config.read_text())
    leaf = Path(document["store_layers"][-1][-1])
    changed_leaf = leaf.with_name(leaf.name + "-changed")
    if not changed_leaf.exists():
        if leaf.is_dir():
            shutil.copytree(leaf, changed_leaf, symlinks=True)
            (changed_leaf / "guix-image-bench-changed").write_text("changed\n")
        else:
            changed_leaf.write_bytes(leaf.read_bytes() + b"\n# changed\n")
    document["store_layers"][-1][-1] = str(changed_leaf)
    changed_config = config.with_name("config-changed.json")
    changed_config.write_text(json.dumps(document, indent=1))
    results = {
        name: Measurement(name)
        for name in ("peer route", "first push", "unchanged", "one leaf changed")
    }
    work = Path(tempfile.mkdtemp(prefix="bench-push-"))
    try:
        for run in range(args.runs):
            directory = work / f"registry-{run}"
            directory.mkdir()
            with running_registry(directory) as registry:
                cache = {**os.environ, "XDG_CACHE_HOME": str(work / f"cache-{run}")}
                peer_cache = {**os.environ, "XDG_CACHE_HOME": str(work / f"peer-cache-{run}")}
                archive = work / "x.tar"
                peer = [
                    ["sh", "-c", f"{' '.join(guix_image)} build -q {config} -o {archive} && "
                     f"skopeo copy -q --dest-tls-verify=false docker-archive:{archive} "
                     f"docker://{registry.host}/peer:1"],
                ]  # fmt: skip
                ref = f"{registry.host}/ours:1"
                push = [*guix_image, "push", "-q", str(config), ref]
                for name, commands, env in [
                    ("peer route", peer, peer_cache),
                    ("first push", [push], cache),  # an empty layer cache
                    ("unchanged", [push], cache),
                ]:
                    seconds, rss = run_timed(commands, env)
                    results[name].seconds.append(seconds)
                    results[name].rss_kb.append(rss)
                changed = [*guix_image, "push", "-q", str(changed_config), ref]
                seconds, rss = run_timed([changed], cache)
                results["one leaf changed"].seconds.append(seconds)
                results["one leaf changed"].rss_kb.append(rss)
            shutil.rmtree(directory, ignore_errors=True)
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = results["first push"].median
    lines = [
        f"### {args.size}, push: {summary}",
        "",
        f"{args.runs} runs, medians; {machine()}.",
        "",
        "| command | median s | x first push | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    for m in results.values():
        lines.append(
            f"| {m.name} | {m.median:.3f} | {m.median / first:.3f} | {max(m.rss_kb) / 1024:.0f} |"
        )
    checks = [
        ("first push <= 0.5 x peer route", first / results["peer route"].median, 0.5),
        ("unchanged <= 0.05 x first push", results["unchanged"].median / first, 0.05),
        ("one leaf changed <= 0.10 x first push", results["one leaf changed"].median / first, 0.10),
    ]
    report(lines, checks, args.record, digits=3)


def report(
    lines: list[str], checks: list[tuple[str, float, float]], record: Path | None, digits: int = 2
) -> None:
    """Print the table `lines` and each check, PASS or FAIL; append them to `record`."""
    lines = (
        lines
        + [""]
        + [
            f"- {'PASS' if value <= limit else 'FAIL'}: {name} (measured {value:.{digits}f})"
            for name, value, limit in checks
        ]
    )
    table = "\n".join(lines)
    print(table)
    if record:
        with record.open("a") as out:
            out.write(table + "\n\n")


def compressed_size(commands: list[list[str]]) -> int:
    """The bytes the pipeline `commands` writes."""
    processes: list[subprocess.Popen[bytes]] = []
    stdin = None
    for command in commands:
        process = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE)
        if stdin is not None:
            stdin.close()
        stdin = process.stdout
        processes.append(process)
    assert stdin is not None
    size = 0
    while chunk := stdin.read(1 << 20):
        size += len(chunk)
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"{process.args} failed with status {process.returncode}")
    return size


def check_targets(
    results: dict[str, Measurement],
    startup: dict[str, Measurement],
    readers: dict[str, Measurement],
) -> list[str]:
    """The targets of the Performance and Readers issues, each PASS or FAIL."""
    floor = results["floor"].median
    digest = readers["openssl dgst -sha256 ARCHIVE"].median
    checks = [
        ("cold build <= 1.2 x floor", results["guix-image cold"].median / floor, 1.2),
        ("warm build <= 0.8 x floor", results["guix-image warm"].median / floor, 0.8),
        (
            "peak RSS <= 100 MiB",
            max(max(m.rss_kb) for n, m in results.items() if n.startswith("guix-image")) / 1024,
            100,
        ),
        ("--help <= 0.150 s", startup["guix-image --help"].median, 0.150),
        ("completion <= 0.150 s", startup["completion request"].median, 0.150),
        (
            "--image completion <= 0.150 s",
            startup["completion of --image in ARCHIVE"].median,
            0.150,
        ),
        ("inspect <= 0.5 s", readers["guix-image inspect ARCHIVE"].median, 0.5),
        ("verify <= 1.0 x openssl dgst", readers["guix-image verify ARCHIVE"].median / digest, 1.0),
    ]
    return [
        f"- {'PASS' if value <= limit else 'FAIL'}: {name} (measured {value:.2f})"
        for name, value, limit in checks
    ]


if __name__ == "__main__":
    main()
