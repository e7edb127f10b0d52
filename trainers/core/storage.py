"""Local paths and storage URIs (``file://``, ``s3://``, ``gs://``, ... whatever pyarrow's
filesystems take), read and written through a filesystem object, never through ``Path`` on a URI."""

from __future__ import annotations

import contextlib
import posixpath
import tempfile
from pathlib import Path
from typing import Iterator


def is_uri(path: str) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """A URI as given; a local path made absolute (Ray Train's workers do not share our cwd)."""
    return str(path) if is_uri(path) else str(Path(path).resolve())


def join(base: str, *names: str) -> str:
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *names)
    return str(Path(base, *names))


def parent(path: str) -> str:
    """The directory holding ``path`` (a URI stays a URI)."""
    if is_uri(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return str(Path(path).resolve().parent)


def filesystem(path: str):
    """``(pyarrow filesystem, path inside it)`` for a local path or a URI; an unknown scheme is a
    ValueError naming it."""
    import pyarrow.fs

    if not is_uri(path):
        return pyarrow.fs.LocalFileSystem(), absolute(path)
    try:
        return pyarrow.fs.FileSystem.from_uri(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError per scheme
        raise ValueError(f"{path!r} is not a storage location pyarrow can open: {e}") from e


def read_text(path: str) -> str:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def exists(path: str) -> bool:
    import pyarrow.fs

    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pyarrow.fs.FileType.NotFound


def copy_dir(src_fs, src: str, dest: str) -> None:
    """Copy directory ``src`` of ``src_fs`` (e.g. a Ray Train checkpoint's) to ``dest``, file by file."""
    import pyarrow.fs

    fs, p = filesystem(dest)
    fs.create_dir(p, recursive=True)
    pyarrow.fs.copy_files(src, p, source_filesystem=src_fs, destination_filesystem=fs)


def remove_dir(path: str) -> None:
    fs, p = filesystem(path)
    fs.delete_dir(p)


@contextlib.contextmanager
def local_dir(path: str) -> Iterator[str]:
    """``path`` as a local directory: itself, or a temporary copy of a remote one."""
    if not is_uri(path) or path.startswith("file://"):
        yield filesystem(path)[1]
        return
    import pyarrow.fs

    fs, p = filesystem(path)
    with tempfile.TemporaryDirectory(prefix="moray-") as tmp:
        pyarrow.fs.copy_files(p, tmp, source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
        yield tmp


@contextlib.contextmanager
def writing_dir(path: str) -> Iterator[str]:
    """``path`` as a local directory to write small files into: itself (created), or for a remote
    URI a temporary directory copied there on exit. Large files go straight to ``path`` instead."""
    if not is_uri(path) or path.startswith("file://"):
        local = filesystem(path)[1]
        Path(local).mkdir(parents=True, exist_ok=True)
        yield local
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory(prefix="moray-") as tmp:
        yield tmp
        copy_dir(pyarrow.fs.LocalFileSystem(), tmp, path)
