"""Workdir files through one path abstraction: etils.epath, as Orbax uses for checkpoints.

Local paths and object-store URLs (`gs://bucket/run`, through fsspec / gcsfs) read and write
alike. Object stores have no append: `append_bytes` uploads the new bytes as an object of
their own and composes it onto the file (GCS `compose`), so a log that grows every step costs
one small upload per step, not a rewrite of the whole file.

TensorBoard: tensorboardX writes event files through its own file layer (its gs:// writer
uses google-cloud-storage and re-uploads the whole event file at every flush);
`register_tensorboard_scheme` routes a scheme's event files through `append_bytes` instead.
"""

from __future__ import annotations

import io
import os
import uuid

from etils import epath

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
    """An epath.Path for a local path or a URL; local paths get `~` expanded."""
    p = os.fspath(p)
    return epath.Path(p if is_remote(p) else os.path.expanduser(p))


def is_remote(p: PathLike) -> bool:
    return "://" in os.fspath(p)


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` as a string (URLs keep their scheme; os.path.join would too, but this
    says what is meant)."""
    return os.fspath(path(base).joinpath(*parts))


def makedirs(p: PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def _fs(p: str):
    import fsspec
    return fsspec.core.url_to_fs(p)


def append_bytes(p: PathLike, data: bytes) -> None:
    """Appends `data` to a file, creating it (and its directory) when missing."""
    p = os.fspath(p)
    if not is_remote(p):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        with open(p, "ab") as f:
            f.write(data)
        return
    fs, key = _fs(p)
    fs.invalidate_cache(key)
    if not fs.exists(key):
        fs.pipe_file(key, data)
    elif hasattr(fs, "merge"):  # GCS: compose [file, part] into file
        part = f"{key}.append-{uuid.uuid4().hex}"
        fs.pipe_file(part, data)
        try:
            fs.merge(key, [key, part])
        finally:
            fs.rm_file(part)
    else:  # a store without compose: rewrite
        fs.pipe_file(key, fs.cat_file(key) + data)
    fs.invalidate_cache(key)


def append_text(p: PathLike, text: str) -> None:
    append_bytes(p, text.encode("utf-8"))


def write_text(p: PathLike, text: str) -> None:
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")


def write_bytes(p: PathLike, data: bytes) -> None:
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def replace_text(p: PathLike, text: str) -> None:
    """Writes a whole file so that a crash leaves the old or the new contents (local: a
    temporary file renamed over it; object stores write an object atomically)."""
    p = os.fspath(p)
    if is_remote(p):
        write_text(p, text)
        return
    tmp = p + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, p)


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copies the files of local directory `src` (recursively) into `dst` (any scheme)."""
    src = os.fspath(src)
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        for name in files:
            target = path(dst) if rel == "." else path(dst) / rel
            with open(os.path.join(root, name), "rb") as f:
                write_bytes(target / name, f.read())


def png_bytes(fig, dpi: int) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# ------------------------------------------------------------------------ TensorBoard
class _AppendingRecordWriter:
    """A tensorboardX record writer: buffers event records, appends them on flush."""

    def __init__(self, p: str):
        self.path = p
        self._buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        data = self._buffer.getvalue()
        if data:
            append_bytes(self.path, data)
            self._buffer = io.BytesIO()

    def close(self) -> None:
        self.flush()


class _AppendingWriterFactory:
    def open(self, p: str) -> _AppendingRecordWriter:
        return _AppendingRecordWriter(p)

    def directory_check(self, p: str) -> None:
        pass  # object stores have no directories to create


def register_tensorboard_scheme(logdir: PathLike) -> None:
    """Routes tensorboardX event files under `logdir`'s URL scheme through `append_bytes`
    (a no-op for local paths, which tensorboardX writes itself)."""
    logdir = os.fspath(logdir)
    if is_remote(logdir):
        from tensorboardX import record_writer
        record_writer.register_writer_factory(logdir.split("://", 1)[0],
                                              _AppendingWriterFactory())
