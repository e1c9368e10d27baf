"""``pyvirt img``: create, inspect, check, convert and change disk images.

The verbs and flags are qemu-img's (``create``, ``info``, ``check``,
``convert``, ``resize``, ``commit``, ``rebase``, ``map``, ``compare``), and so
are the outputs (human and ``--output json``) and ``check``'s exit codes.
Other errors follow the project's rule: one line naming the problem, exit
status 2, nothing half-written (``create`` and ``convert`` write a temporary
file next to the destination and rename it into place at the end).

The format of a named file is ``-f`` if given, else probed from its first
bytes: this is a host tool run on the user's own files, so probing is fine
(a VM's disks are never probed as qcow2 when writable; see pyvirt.disk.open).

Imported only when ``pyvirt img`` runs (lazy subcommand of the CLI).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pyvirt.cli.main import _guarded
from pyvirt.disk.backend import DiskBackend, DiskError, Extent
from pyvirt.disk.copy import copy_content as _copy
from pyvirt.disk.copy import extents as _extents
from pyvirt.disk.copy import read_range as _read
from pyvirt.errors import PyvirtError

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = ["img"]

_CHUNK = 1 << 20  # bytes read/written at a time
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)\s*$", re.IGNORECASE)
_SUFFIX = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_QCOW2_OPTS = ("cluster_size", "compat", "lazy_refcounts", "preallocation", "refcount_bits",
               "extended_l2", "compression_type", "backing_file", "backing_fmt")
_RAW_OPTS = ("preallocation",)


class ImgError(PyvirtError):
    """A failure that is not the user's input (exit 1, as qemu-img)."""


def _bad(text: str) -> DiskError:
    return DiskError(text)


def parse_size(text: str, what: str = "size") -> int:
    """A size as qemu-img reads it: bytes, or with a k/M/G/T/P/E suffix (1024-based)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise _bad(f"{what}: invalid size {text!r} (e.g. 10G, 512M, 65536)")
    value = float(m.group(1)) * (1 << _SUFFIX[m.group(2).lower()])
    if value >= 1 << 63:
        raise _bad(f"{what}: {text!r} is too large")
    return int(value)


def size_to_str(value: int) -> str:
    """qemu's size_to_str: "1 MiB", "324 KiB", "1.5 GiB"."""
    suffixes = ("", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = math.trunc((exp - 1) / 10)
    return "%0.3g %s" % (value / (1 << (i * 10)), suffixes[i])  # noqa: UP031  (C's %g)


def _parse_options(text: tuple[str, ...], fmt: str) -> dict[str, str]:
    known = _QCOW2_OPTS if fmt == "qcow2" else _RAW_OPTS
    out: dict[str, str] = {}
    for chunk in text:
        for item in chunk.split(","):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep:
                raise _bad(f"-o: {item!r} is not KEY=VALUE")
            if key not in known:
                raise _bad(f"-o: invalid parameter {key!r} for format {fmt} "
                           f"(known: {', '.join(known)})")
            out[key] = value
    return out


def _on_off(opts: dict[str, str], key: str) -> bool:
    value = opts.get(key, "off")
    if value not in ("on", "off", "true", "false"):
        raise _bad(f"-o {key}: expected on or off, not {value!r}")
    return value in ("on", "true")


def _probe(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("raw", "qcow2"):
            raise _bad(f"-f: unknown format {fmt!r} (expected raw or qcow2)")
        return fmt
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise _bad(f"{path}: {exc.strerror}") from None
    return "qcow2" if head == b"QFI\xfb" else "raw"


def _open(path: Path, fmt: str | None, *, readonly: bool, backing: bool = True,
          role: str = "image") -> DiskBackend:
    """Open an image; errors read ``ROLE: PATH: what is wrong``."""
    from pyvirt.disk.open import open_disk

    return open_disk(path, format=_probe(path, fmt), readonly=readonly, what=role,
                     backing=backing)


def _backing_path(image: Path, name: str) -> Path:
    """Where a recorded backing name points (qemu's path_combine: relative to
    the image's directory, as the image's path was given)."""
    if os.path.isabs(name):
        return Path(name)
    return Path(os.path.join(os.path.dirname(str(image)), name))


def _q(disk: DiskBackend) -> Any:
    """The qcow2-only attributes (Qcow2Disk) of a backend known to be qcow2."""
    return disk


@contextlib.contextmanager
def _progress(enabled: bool, total: int, what: str) -> Iterator[Callable[[int], None]]:
    if not enabled or total <= 0:
        yield lambda n: None
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeRemainingColumn

    bar: Progress = Progress("[progress.description]{task.description}", BarColumn(),
                             TaskProgressColumn(), TimeRemainingColumn(),
                             console=_stderr_console(), transient=False)
    with bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _run(ctx: click.Context, fn: Callable[[], int]) -> None:
    sys.exit(_guarded(ctx, fn))


@contextlib.contextmanager
def _staged(dest: Path) -> Iterator[Path]:
    """A temporary path next to ``dest``, renamed onto it when the block ends
    normally, removed on any error (Ctrl-C included)."""
    if dest.exists() and dest.is_file():
        # replacing an image a VM has open would leave it writing a ghost file
        from pyvirt.disk.lock import open_image_file

        open_image_file(dest, readonly=False, direct=False, what=str(dest)).close()
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


# -- the group -----------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def img() -> None:
    """Create, inspect, check and convert disk images (raw, qcow2), as qemu-img.

    See docs/images.md."""


# -- create --------------------------------------------------------------------


def _create_image(path: Path, fmt: str, size: int | None, opts: dict[str, str],
                  backing: str | None, backing_fmt: str | None, quiet: bool = False) -> None:
    backing = opts.pop("backing_file", backing)
    backing_fmt = opts.pop("backing_fmt", backing_fmt)
    if backing and fmt == "raw":
        raise _bad("Backing file not supported for file format 'raw'")
    if backing is not None and backing_fmt is None:
        raise _bad(f"{path}: Backing file specified without backing format (give -F)")
    if backing_fmt is not None and backing_fmt not in ("raw", "qcow2"):
        raise _bad(f"-F: unknown backing format {backing_fmt!r} (expected raw or qcow2)")
    if backing:
        base = _backing_path(path, backing)
        disk = _open(base, backing_fmt, readonly=True, role="backing file")
        try:
            if size is None:
                size = disk.size
        finally:
            disk.close()
    if size is None:
        raise _bad(f"{path}: a size is needed (or -b BACKING to take the backing file's)")
    if size % 512:
        size = -(-size // 512) * 512  # as qemu-img: whole sectors
    with _staged(path) as tmp:
        if fmt == "raw":
            from pyvirt.disk.raw import create_raw

            prealloc = opts.get("preallocation", "off")
            if prealloc not in ("off", "full", "falloc"):
                raise _bad(f"-o preallocation: {prealloc!r} is not off, falloc or full")
            create_raw(tmp, size)
            if prealloc != "off" and size:
                fd = os.open(tmp, os.O_WRONLY)
                try:
                    os.posix_fallocate(fd, 0, size)
                finally:
                    os.close(fd)
        else:
            from pyvirt.disk.qcow2 import create_qcow2

            kwargs = _qcow2_kwargs(opts)
            create_qcow2(tmp, size, backing=backing or None, backing_format=backing_fmt,
                         **kwargs)
    if not quiet:
        extra = f" backing_file={backing} backing_fmt={backing_fmt}" if backing else ""
        click.echo(f"Formatting '{path}', fmt={fmt} size={size}{extra}")


def _qcow2_kwargs(opts: dict[str, str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if "cluster_size" in opts:
        cs = parse_size(opts["cluster_size"], "-o cluster_size")
        if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
            raise _bad("-o cluster_size: must be a power of two between 512 and 2M")
        kwargs["cluster_size"] = cs
    if "compat" in opts:
        compat = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}.get(opts["compat"])
        if compat is None:
            raise _bad(f"-o compat: {opts['compat']!r} is not 0.10 or 1.1")
        kwargs["version"] = compat
    if "lazy_refcounts" in opts:
        kwargs["lazy_refcounts"] = _on_off(opts, "lazy_refcounts")
    if "extended_l2" in opts:
        kwargs["extended_l2"] = _on_off(opts, "extended_l2")
    if "refcount_bits" in opts:
        try:
            bits = int(opts["refcount_bits"])
        except ValueError:
            bits = 0
        if bits not in (1, 2, 4, 8, 16, 32, 64):
            raise _bad("-o refcount_bits: must be a power of two from 1 to 64")
        kwargs["refcount_bits"] = bits
    if "preallocation" in opts:
        if opts["preallocation"] not in ("off", "metadata", "full"):
            raise _bad(f"-o preallocation: {opts['preallocation']!r} is not off, metadata "
                       "or full")
        kwargs["preallocation"] = opts["preallocation"]
    if "compression_type" in opts:
        if opts["compression_type"] not in ("zlib", "zstd"):
            raise _bad("-o compression_type: must be zlib or zstd")
        kwargs["compression_type"] = opts["compression_type"]
    if kwargs.get("version") == 2:
        for key, default in (("lazy_refcounts", False), ("extended_l2", False),
                             ("refcount_bits", 16), ("compression_type", "zlib")):
            if kwargs.get(key, default) != default:
                raise _bad(f"-o {key}: needs compat=1.1")
    return kwargs


@img.command()
@click.option("-f", "fmt", type=click.Choice(["raw", "qcow2"]), default="raw",
              show_default=True, help="Image format.")
@click.option("-b", "backing", metavar="BACKING", help="Backing file (qcow2; needs -F).")
@click.option("-F", "backing_fmt", type=click.Choice(["raw", "qcow2"]),
              help="The backing file's format.")
@click.option("-o", "options", multiple=True, metavar="OPTS",
              help="cluster_size=..,compat=0.10|1.1,lazy_refcounts=on,preallocation="
                   "off|metadata|full,refcount_bits=..,extended_l2=on,compression_type=zlib|zstd")
@click.option("-q", "quiet", is_flag=True, help="Print nothing.")
@click.argument("filename", type=click.Path(path_type=Path))
@click.argument("size", required=False)
@click.pass_context
def create(ctx: click.Context, fmt: str, backing: str | None, backing_fmt: str | None,
           options: tuple[str, ...], quiet: bool, filename: Path, size: str | None) -> None:
    """Create FILENAME of SIZE bytes (k, M, G, T suffixes); SIZE defaults to the
    backing file's with -b."""

    def go() -> int:
        opts = _parse_options(options, fmt)
        _create_image(filename, fmt, parse_size(size) if size is not None else None, opts,
                      backing, backing_fmt, quiet)
        return 0

    _run(ctx, go)


# -- info ----------------------------------------------------------------------


def _image_info(path: Path, fmt: str | None) -> tuple[dict[str, Any], tuple[Path, str] | None]:
    """qemu-img info's document for one image, and (path, format) of its backing
    file (probed when not recorded: backing files are read-only)."""
    disk = _open(path, fmt, readonly=True, backing=False)
    try:
        st = os.stat(path)
        doc: dict[str, Any] = {}
        nxt: tuple[Path, str] | None = None
        if disk.format == "qcow2":
            q = _q(disk)
            if q.backing_name:
                full = _backing_path(path, q.backing_name)
                bfmt = q.backing_format or _probe(full, None)
                if q.backing_format:
                    doc["backing-filename-format"] = q.backing_format
                nxt = (full, bfmt)
            doc["virtual-size"] = disk.size
            doc["filename"] = str(path)
            doc["cluster-size"] = q.cluster_size
            doc["format"] = "qcow2"
            doc["actual-size"] = st.st_blocks * 512
            doc["format-specific"] = {"type": "qcow2", "data": q.info()}
            if q.backing_name:
                doc["full-backing-filename"] = str(_backing_path(path, q.backing_name))
                doc["backing-filename"] = q.backing_name
            doc["dirty-flag"] = bool(q.dirty)
        else:
            doc.update({"virtual-size": disk.size, "filename": str(path), "format": "raw",
                        "actual-size": st.st_blocks * 512, "dirty-flag": False})
        return doc, nxt
    finally:
        disk.close()


def _info_human(doc: dict[str, Any]) -> str:
    lines = [f"image: {doc['filename']}", f"file format: {doc['format']}",
             f"virtual size: {size_to_str(doc['virtual-size'])} ({doc['virtual-size']} bytes)",
             f"disk size: {size_to_str(doc['actual-size'])}"]
    if "cluster-size" in doc:
        lines.append(f"cluster_size: {doc['cluster-size']}")
    if doc.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in doc:
        line = f"backing file: {doc['backing-filename']}"
        if doc["full-backing-filename"] != doc["backing-filename"]:
            line += f" (actual path: {doc['full-backing-filename']})"
        lines.append(line)
    if "backing-filename-format" in doc:
        lines.append(f"backing file format: {doc['backing-filename-format']}")
    if "format-specific" in doc:
        lines.append("Format specific information:")
        for key, value in doc["format-specific"]["data"].items():
            shown = str(value).lower() if isinstance(value, bool) else value
            lines.append(f"    {key.replace('-', ' ')}: {shown}")
    return "\n".join(lines)


@img.command()
@click.option("-f", "fmt", type=click.Choice(["raw", "qcow2"]), help="Image format (probed).")
@click.option("--backing-chain", is_flag=True, help="Also show every backing file.")
@click.option("--output", type=click.Choice(["human", "json"]), default="human",
              show_default=True)
@click.argument("filename", type=click.Path(path_type=Path))
@click.pass_context
def info(ctx: click.Context, fmt: str | None, backing_chain: bool, output: str,
         filename: Path) -> None:
    """Show an image's format, sizes and backing file (as qemu-img info)."""

    def go() -> int:
        from pyvirt.disk.backend import ChainLimits

        docs: list[dict[str, Any]] = []
        nxt: tuple[Path, str | None] | None = (filename, fmt)
        seen: set[tuple[int, int]] = set()
        while nxt is not None:
            path, f = nxt
            try:
                st = os.stat(path)
            except OSError as exc:
                raise _bad(f"{path}: {exc.strerror}") from None
            if (st.st_dev, st.st_ino) in seen:
                raise _bad(f"{path}: the backing chain loops back to this file")
            if len(seen) > ChainLimits().max_depth:
                raise _bad(f"{filename}: the backing chain is too deep")
            seen.add((st.st_dev, st.st_ino))
            doc, following = _image_info(path, f)
            docs.append(doc)
            nxt = following if backing_chain else None
        if output == "json":
            click.echo(json.dumps(docs if backing_chain else docs[0], indent=4))
        else:
            click.echo("\n\n".join(_info_human(d) for d in docs))
        return 0

    _run(ctx, go)


# -- check ---------------------------------------------------------------------


def _check_human(res: Any) -> str:
    out: list[str] = []
    if res.corruptions == 0 and res.leaks == 0 and res.check_errors == 0:
        out.append("No errors were found on the image.")
    else:
        if res.corruptions:
            out.append(f"\n{res.corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.")
        if res.leaks:
            out.append(f"\n{res.leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.")
        if res.check_errors:
            out.append(f"\n{res.check_errors} internal errors have occurred during the check.")
    if res.total_clusters and res.allocated_clusters:
        out.append(f"{res.allocated_clusters}/{res.total_clusters} = "
                   f"{res.allocated_clusters * 100.0 / res.total_clusters:.2f}% allocated, "
                   f"{res.fragmented_clusters * 100.0 / res.allocated_clusters:.2f}% fragmented, "
                   f"{res.compressed_clusters * 100.0 / res.allocated_clusters:.2f}% compressed "
                   "clusters")
    if res.image_end_offset:
        out.append(f"Image end offset: {res.image_end_offset}")
    return "\n".join(out)


@img.command()
@click.option("-f", "fmt", type=click.Choice(["raw", "qcow2"]), help="Image format (probed).")
@click.option("-r", "repair", type=click.Choice(["leaks", "all"]),
              help="Repair leaks, or everything that can be repaired.")
@click.option("--output", type=click.Choice(["human", "json"]), default="human",
              show_default=True)
@click.option("-q", "quiet", is_flag=True, help="Print nothing (the exit status says it).")
@click.argument("filename", type=click.Path(path_type=Path))
@click.pass_context
def check(ctx: click.Context, fmt: str | None, repair: str | None, output: str, quiet: bool,
          filename: Path) -> None:
    """Check (and with -r repair) a qcow2 image's metadata, as qemu-img check.

    Exit status: 0 clean, 2 corruptions, 3 leaked clusters only, 1 the check
    could not complete, 63 the format has no checks (raw)."""

    def go() -> int:
        from pyvirt.disk.lock import open_image_file
        from pyvirt.disk.qcow2_check import check_qcow2

        if _probe(filename, fmt) != "qcow2":
            click.echo("pyvirt: error: This image format does not support checks", err=True)
            return 63
        file = open_image_file(filename, readonly=repair is None, direct=False,
                               what=str(filename))
        try:
            if not file.block_device and os.pread(file.fd, 4, 0) != b"QFI\xfb":
                raise _bad(f"{filename} is not a qcow2 image (no qcow2 header)")
            res = check_qcow2(file.fd, repair=repair, filename=str(filename))
        finally:
            file.close()
        for line in res.messages:
            click.echo(line, err=True)
        if quiet:
            pass
        elif output == "json":
            click.echo(json.dumps(res.to_json(), indent=4))
        else:
            if res.corruptions_fixed or res.leaks_fixed:
                click.echo("The following inconsistencies were found and repaired:\n\n"
                           f"    {res.leaks_fixed} leaked clusters\n"
                           f"    {res.corruptions_fixed} corruptions\n\n"
                           "Double checking the fixed image now...")
            click.echo(_check_human(res))
        if res.check_errors:
            click.echo("pyvirt: error: Check failed", err=True)
            return 1
        return 2 if res.corruptions else 3 if res.leaks else 0

    _run(ctx, go)


# -- convert -------------------------------------------------------------------


@img.command()
@click.option("-f", "fmt", type=click.Choice(["raw", "qcow2"]), help="Source format (probed).")
@click.option("-O", "out_fmt", type=click.Choice(["raw", "qcow2"]), default="raw",
              show_default=True, help="Output format.")
@click.option("-o", "options", multiple=True, metavar="OPTS", help="Output options (as create).")
@click.option("-S", "sparse", default="4k", show_default=True, metavar="SIZE",
              help="Zero runs of at least SIZE are not written (0: write everything).")
@click.option("-B", "backing", metavar="BACKING",
              help="The output's backing file (qcow2): only what differs from it is written.")
@click.option("-F", "backing_fmt", type=click.Choice(["raw", "qcow2"]),
              help="The format of -B (probed when not given).")
@click.option("-p", "progress", is_flag=True, help="Show a progress bar.")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.pass_context
def convert(ctx: click.Context, fmt: str | None, out_fmt: str, options: tuple[str, ...],
            sparse: str, backing: str | None, backing_fmt: str | None, progress: bool,
            src: Path, dst: Path) -> None:
    """Copy SRC (flattening its backing chain) into a new image DST."""

    def go() -> int:
        opts = _parse_options(options, out_fmt)
        step = parse_size(sparse, "-S")
        if step % 512:
            raise _bad("-S: must be a multiple of 512")
        if backing is not None and out_fmt != "qcow2":
            raise _bad("-B: a backing file needs -O qcow2")
        source = _open(src, fmt, readonly=True, role="source")
        try:
            bfmt = backing_fmt
            if backing is not None and bfmt is None:
                bfmt = _probe(_backing_path(dst, backing), None)
            with _staged(dst) as tmp:
                _create_image(tmp, out_fmt, source.size, dict(opts), backing, bfmt, quiet=True)
                out = _open(tmp, out_fmt, readonly=False, role="target")
                try:
                    base = out.chain()[1] if backing is not None and len(out.chain()) > 1 \
                        else None
                    with _progress(progress, source.size, "convert") as tick:
                        _copy(source, out, sparse=step, base=base, tick=tick)
                    out.flush()
                finally:
                    out.close()
        finally:
            source.close()
        return 0

    _run(ctx, go)


# -- resize --------------------------------------------------------------------


@img.command(context_settings={"ignore_unknown_options": True})
@click.option("-f", "fmt", type=click.Choice(["raw", "qcow2"]), help="Image format (probed).")
@click.option("--shrink", is_flag=True, help="Allow making the image smaller (data is lost).")
@click.argument("filename", type=click.Path(path_type=Path))
@click.argument("size")
@click.pass_context
def resize(ctx: click.Context, fmt: str | None, shrink: bool, filename: Path, size: str) -> None:
    """Set FILENAME's virtual size to SIZE, or grow/shrink it by +SIZE/-SIZE."""

    def go() -> int:
        sign = size[:1] if size[:1] in "+-" else ""
        amount = parse_size(size[1:] if sign else size)
        disk = _open(filename, fmt, readonly=False)  # with its chain: growth reads as zeros
        try:
            new = disk.size + amount if sign == "+" else disk.size - amount if sign else amount
            if new <= 0:
                raise _bad("New image size must be positive")
            if new % 512:
                raise _bad(f"new size {new} is not a multiple of 512")
            if new < disk.size and not shrink:
                raise _bad("Use the --shrink option to perform a shrink operation.")
            disk.resize(new)
            disk.flush()
        finally:
            disk.close()
        click.echo("Image resized.")
        return 0

    _run(ctx, go)


# -- commit --------------------------------------------------------------------


@img.command()
@click.option("-f", "fmt", type=click.Choice(["raw", "qcow2"]), help="Image format (probed).")
@click.option("-d", "keep", is_flag=True, help="Keep the image as it is (do not empty it).")
@click.option("-p", "progress", is_flag=True, help="Show a progress bar.")
@click.argument("filename", type=click.Path(path_type=Path))
@click.pass_context
def commit(ctx: click.Context, fmt: str | None, keep: bool, progress: bool,
           filename: Path) -> None:
    """Write the image's own data into its backing file; then empty the image
    (unless -d), so it reads the same through its backing file."""

    def go() -> int:
        top = _open(filename, fmt, readonly=keep, backing=False)
        try:
            q = _q(top)
            if top.format != "qcow2" or not q.backing_name:
                raise _bad(f"{filename}: has no backing file to commit to")
            base_path = _backing_path(filename, q.backing_name)
            base = _open(base_path, q.backing_format, readonly=False, backing=False,
                         role="backing file")
            try:
                if base.size < top.size:
                    base.resize(top.size)
                with _progress(progress, top.size, "commit") as tick:
                    for ext in _extents(top):
                        if ext.present and ext.depth == 0:
                            _copy_range(top, base, ext, tick)
                        else:
                            tick(ext.length)
                base.flush()
            finally:
                base.close()
            if not keep:
                q.discard(0, top.size, full=True)  # unallocated: reads through the base
                top.flush()
        finally:
            top.close()
        click.echo("Image committed.")
        return 0

    _run(ctx, go)


def _copy_range(src: DiskBackend, dst: DiskBackend, ext: Extent,
                tick: Callable[[int], None]) -> None:
    if ext.zero and not ext.data:
        dst.write_zeroes(ext.offset, ext.length, unmap=False)
        tick(ext.length)
        return
    offset, end = ext.offset, ext.offset + ext.length
    while offset < end:
        n = min(_CHUNK, end - offset)
        dst.writev([memoryview(_read(src, offset, n))], offset)
        offset += n
        tick(n)


# -- rebase --------------------------------------------------------------------


@img.command()
@click.option("-f", "fmt", type=click.Choice(["raw", "qcow2"]), help="Image format (probed).")
@click.option("-u", "unsafe", is_flag=True,
              help="Only rewrite the backing file name (the content is not compared).")
@click.option("-b", "backing", required=True, metavar="BACKING",
              help='The new backing file ("" for none).')
@click.option("-F", "backing_fmt", type=click.Choice(["raw", "qcow2"]),
              help="The new backing file's format (probed when not given).")
@click.option("-p", "progress", is_flag=True, help="Show a progress bar.")
@click.argument("filename", type=click.Path(path_type=Path))
@click.pass_context
def rebase(ctx: click.Context, fmt: str | None, unsafe: bool, backing: str,
           backing_fmt: str | None, progress: bool, filename: Path) -> None:
    """Change the image's backing file; without -u, first copy into the image
    the clusters whose content differs between the old and new backing files,
    so what the image reads stays the same."""

    def go() -> int:
        if _probe(filename, fmt) != "qcow2":
            raise _bad(f"{filename}: only a qcow2 image has a backing file")
        new_fmt = backing_fmt
        new_path = _backing_path(filename, backing) if backing else None
        if new_path is not None and new_fmt is None:
            new_fmt = _probe(new_path, None)
        top = _open(filename, "qcow2", readonly=False, backing=False)
        try:
            q = _q(top)
            if not unsafe:
                _rebase_copy(top, filename, q, new_path, new_fmt, progress)
            q.set_backing(backing or None, new_fmt if backing else None)
            top.flush()
        finally:
            top.close()
        return 0

    _run(ctx, go)


def _rebase_copy(top: DiskBackend, filename: Path, q: Any, new_path: Path | None,
                 new_fmt: str | None, progress: bool) -> None:
    old = new = None
    try:
        if q.backing_name:
            old = _open(_backing_path(filename, q.backing_name), q.backing_format,
                        readonly=True, role="old backing file")
        if new_path is not None:
            new = _open(new_path, new_fmt, readonly=True, role="new backing file")

        def content(disk: DiskBackend | None, offset: int, n: int) -> bytes:
            if disk is None or offset >= disk.size:
                return bytes(n)
            data = _read(disk, offset, min(n, disk.size - offset))
            return bytes(data) + bytes(n - len(data))

        with _progress(progress, top.size, "rebase") as tick:
            for ext in _extents(top):
                if ext.present and ext.depth == 0:
                    tick(ext.length)
                    continue
                offset, end = ext.offset, ext.offset + ext.length
                while offset < end:
                    n = min(_CHUNK, end - offset)
                    was, will = content(old, offset, n), content(new, offset, n)
                    if was != will:
                        top.writev([memoryview(bytearray(was))], offset)
                    offset += n
                    tick(n)
    finally:
        for disk in (old, new):
            if disk is not None:
                disk.close()


# -- map -----------------------------------------------------------------------


def _map_entries(disk: DiskBackend) -> Iterator[dict[str, Any]]:
    chain = disk.chain()
    cur: dict[str, Any] | None = None
    for ext in _extents(disk):
        entry: dict[str, Any] = {
            "start": ext.offset, "length": ext.length,
            "depth": ext.depth if ext.present else len(chain) - 1,
            "present": ext.present, "zero": ext.zero, "data": ext.data}
        if ext.host_offset is not None:
            entry["offset"] = ext.host_offset
        entry["_file"] = str(ext.file) if ext.file is not None else None
        entry["_compressed"] = ext.compressed
        if cur is not None and _mergeable(cur, entry):
            cur["length"] += entry["length"]
            continue
        if cur is not None:
            yield cur
        cur = entry
    if cur is not None:
        yield cur


def _mergeable(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("zero", "data", "depth", "present", "_file")
    if any(a[k] != b[k] for k in keys) or ("offset" in a) != ("offset" in b):
        return False
    return "offset" not in a or a["offset"] + a["length"] == b["offset"]


def _map_json(e: dict[str, Any]) -> str:
    b = {True: "true", False: "false"}
    text = (f'{{ "start": {e["start"]}, "length": {e["length"]}, "depth": {e["depth"]},'
            f' "present": {b[e["present"]]}, "zero": {b[e["zero"]]}, "data": {b[e["data"]]}')
    if "offset" in e:
        text += f', "offset": {e["offset"]}'
    return text + "}"


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"


@img.command(name="map")
@click.option("-f", "fmt", type=click.Choice(["raw", "qcow2"]), help="Image format (probed).")
@click.option("--output", type=click.Choice(["human", "json"]), default="human",
              show_default=True)
@click.argument("filename", type=click.Path(path_type=Path))
@click.pass_context
def map_(ctx: click.Context, fmt: str | None, output: str, filename: Path) -> None:
    """Show where each range of the image's content comes from (as qemu-img map)."""

    def go() -> int:
        disk = _open(filename, fmt, readonly=True)
        try:
            entries = list(_map_entries(disk))
        finally:
            disk.close()
        if output == "json":
            click.echo("[" + ",\n".join(_map_json(e) for e in entries) + "]")
            return 0
        lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
        for e in entries:
            if e["data"] and "offset" not in e:
                raise ImgError("File contains external, encrypted or compressed clusters.")
            if e["data"] and not e["zero"]:
                lines.append(f"{_hex(e['start']):<16}{_hex(e['length']):<16}"
                             f"{_hex(e.get('offset', 0)):<16}{e['_file'] or ''}")
        click.echo("\n".join(lines))
        return 0

    _run(ctx, go)


# -- compare -------------------------------------------------------------------


@img.command()
@click.option("-f", "fmt_a", type=click.Choice(["raw", "qcow2"]), help="First format (probed).")
@click.option("-F", "fmt_b", type=click.Choice(["raw", "qcow2"]), help="Second format (probed).")
@click.option("-p", "progress", is_flag=True, help="Show a progress bar.")
@click.argument("first", type=click.Path(path_type=Path))
@click.argument("second", type=click.Path(path_type=Path))
@click.pass_context
def compare(ctx: click.Context, fmt_a: str | None, fmt_b: str | None, progress: bool,
            first: Path, second: Path) -> None:
    """Compare two images' content: exit 0 identical, 1 different (as qemu-img compare)."""

    def go() -> int:
        a = _open(first, fmt_a, readonly=True)
        try:
            b = _open(second, fmt_b, readonly=True)
            try:
                return _compare(a, b, progress)
            finally:
                b.close()
        finally:
            a.close()

    _run(ctx, go)


def _compare(a: DiskBackend, b: DiskBackend, progress: bool) -> int:
    common = min(a.size, b.size)
    if a.size != b.size:
        click.echo("Warning: Image size mismatch!")
    with _progress(progress, max(a.size, b.size), "compare") as tick:
        offset = 0
        while offset < max(a.size, b.size):
            n = min(_CHUNK, max(a.size, b.size) - offset)
            if offset < common:
                n = min(n, common - offset)
                x, y = _read(a, offset, n), _read(b, offset, n)
            else:
                longer = a if a.size > b.size else b
                x, y = _read(longer, offset, n), bytearray(n)
            if x != y:
                at = next(i for i in range(n) if x[i] != y[i])
                sector = (offset + at) // 512 * 512
                click.echo(f"Content mismatch at offset {sector}!")
                return 1
            offset += n
            tick(n)
    click.echo("Images are identical.")
    return 0
