"""Storage access in one place: local paths, shared folders, any URI pyarrow opens (s3://, gs://, file://) and any
that fsspec knows (the Hub's `hf://`, fsspec plugins). Whole-file writes are atomic everywhere, and a write or
upload that fails for a reason that can pass (a reset connection, a throttled request) is tried again."""

from __future__ import annotations

import errno
import sys
import time
import uuid

RETRY_DELAYS_S = (1, 2, 4, 8, 16)  # up to 5 retries over ~30 s, then the error stands
# failures no retry mends: the path, the permissions or the space are wrong
PERMANENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
PERMANENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}


def filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs

    if "://" not in path:
        from pathlib import Path

        return pyarrow.fs.LocalFileSystem(), str(Path(path).expanduser())
    try:
        return pyarrow.fs.FileSystem.from_uri(path)
    except pyarrow.ArrowInvalid:  # a scheme pyarrow does not know: fsspec's (hf://, and what plugins register)
        import fsspec

        fsspec_fs, inner = fsspec.core.url_to_fs(path)
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fsspec_fs)), inner


def transient(e: BaseException) -> bool:
    return isinstance(e, OSError) and not isinstance(e, PERMANENT) and e.errno not in PERMANENT_ERRNOS


def retried(what: str, fn, *args, **kwargs):
    """fn(*args), again after each delay of RETRY_DELAYS_S while it fails transiently; one line per retry."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            if delay is None or not transient(e):
                raise
            print(f"storage       {what} failed ({str(e).splitlines()[0][:200]}); trying again in {delay}s",
                  file=sys.stderr, flush=True)
            time.sleep(delay)


def is_remote(path: str) -> bool:
    """A URI (object stores, the Hub, file://): written without renames, read through a node-local copy."""
    return "://" in path


def root(configured: str | None = None) -> str:
    """Where runs live: the configured storage, else RAYTRAIN_ALIGN_STORAGE, else ~/ray_results (Ray's default);
    a local one as an absolute path."""
    import os
    from pathlib import Path

    path = configured or os.environ.get("RAYTRAIN_ALIGN_STORAGE") or "~/ray_results"
    return path if is_remote(path) else str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def info(path: str):
    fs, p = filesystem(path)
    return fs.get_file_info(p)


def exists(path: str) -> bool:
    import pyarrow.fs

    return info(path).type != pyarrow.fs.FileType.NotFound


def is_dir(path: str) -> bool:
    import pyarrow.fs

    return info(path).type == pyarrow.fs.FileType.Directory


def write_bytes(path: str, data: bytes) -> None:
    """A whole file: temp name + rename on filesystems, one object put on object stores (atomic either way)."""
    fs, p = filesystem(path)

    def write():
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        tmp = p if is_remote(path) else f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        if tmp != p:
            fs.move(tmp, p)

    retried(f"writing {path}", write)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def read_text(path: str) -> str | None:
    """The file's text, or None if there is no such file."""
    import pyarrow.fs

    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def list_files(folder: str, recursive: bool = True) -> list[str]:
    """Files under `folder` (same form as `folder`: path or URI), sorted; temp files of unfinished writes left out."""
    import pyarrow.fs

    fs, p = filesystem(folder)
    if fs.get_file_info(p).type != pyarrow.fs.FileType.Directory:
        return []
    infos = fs.get_file_info(pyarrow.fs.FileSelector(p, recursive=recursive))
    return sorted(join(folder, i.path[len(p):].lstrip("/")) for i in infos
                  if i.type == pyarrow.fs.FileType.File and ".tmp-" not in i.base_name)


def list_dirs(folder: str) -> list[str]:
    """Names of the folders directly under `folder`."""
    import pyarrow.fs

    fs, p = filesystem(folder)
    sel = pyarrow.fs.FileSelector(p, allow_not_found=True)
    return sorted(i.base_name for i in fs.get_file_info(sel) if i.type == pyarrow.fs.FileType.Directory)


def delete_dir(path: str) -> None:
    fs, p = filesystem(path)
    if exists(path):
        fs.delete_dir(p)


def copy_to_local(src: str, dest: str, chunk: int = 64 << 20) -> None:
    """Stream one file to a local path in chunks (never whole in memory), renamed into place when complete."""
    import os

    fs, p = filesystem(src)

    def copy():
        tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_input_stream(p) as fin, open(tmp, "wb") as fout:
            while block := fin.read(chunk):
                fout.write(block)
        os.replace(tmp, dest)

    retried(f"reading {src}", copy)


def upload_dir(local_dir: str, fs, root: str, chunk: int = 64 << 20) -> None:
    """Every file under a local folder to `root` on pyarrow filesystem `fs`, streamed; a file whose upload fails
    transiently is sent again from its start (its local copy is there to be read again)."""
    import os

    for folder, _, names in os.walk(local_dir):
        rel = os.path.relpath(folder, local_dir)
        target_dir = root if rel == "." else join(root, *rel.split(os.sep))
        for name in names:
            def upload(src=os.path.join(folder, name), target=join(target_dir, name)):
                fs.create_dir(target_dir, recursive=True)
                with open(src, "rb") as fin, fs.open_output_stream(target) as fout:
                    while block := fin.read(chunk):
                        fout.write(block)

            retried(f"uploading {join(target_dir, name)}", upload)


def nearest_existing(path: str):
    """The local path itself, or its nearest ancestor that exists (what a folder still to be made lives on)."""
    from pathlib import Path

    p = Path(path).expanduser().absolute()
    while not p.exists():
        p = p.parent
    return p


def unwritable(path: str) -> str | None:
    """Why a local folder could not be created or written (its nearest existing ancestor decides), else None.
    URIs are not probed: an object store answers only when written to."""
    import os

    if is_remote(path):
        return None
    p = nearest_existing(path)
    if not p.is_dir():
        return f"'{p}' is a file, not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"'{p}' is not writable by this user"
    if os.statvfs(p).f_flag & os.ST_RDONLY:
        return f"'{p}' is on a read-only file system"
    return None
