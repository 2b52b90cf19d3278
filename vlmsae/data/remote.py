"""Reading stores and WebDataset tars that are not local files: fsspec URLs and ``pipe:`` commands.

``https://host/store``, ``s3://bucket/store`` (needs ``pip install s3fs``; imported only for such a URL) and any
other fsspec protocol are opened with fsspec; ``pipe:<command>`` runs the command and reads its stdout
(webdataset's ``gopen``). A store given as a ``pipe:`` command names its files with ``{name}``, e.g.
``'pipe:aws s3 cp s3://bucket/store/{name} -'``. Errors name the URL and what was missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

# fsspec protocol -> the package that implements it (fsspec imports it on first use)
_PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def is_remote(path: Any) -> bool:
    """True for a URL (``scheme://...``) or a ``pipe:`` command, False for a local path."""
    text = str(path)
    return text.startswith("pipe:") or "://" in text


def join_url(base: str, name: str) -> str:
    """The file ``name`` beside ``base``: ``base/name``, or ``{name}`` filled in for a ``pipe:`` command."""
    if base.startswith("pipe:"):
        if "{name}" not in base:
            raise ValueError(
                f"the store {base!r} is a pipe: command without a {{name}} placeholder: write it so that "
                "{name} becomes each file of the store, e.g. 'pipe:curl -fsS https://host/store/{name}'"
            )
        return base.replace("{name}", name)
    return base.rstrip("/") + "/" + name


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of ``url``; a clear error when its protocol's package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        protocol = url.split("://", 1)[0]
        package = _PROTOCOL_PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise ImportError(f"reading {url} needs {package}: pip install {package} ({err})") from err


@contextmanager
def open_stream(url: str, what: str = "file") -> Iterator[IO[bytes]]:
    """A sequential binary stream of ``url``; missing or unreachable: an error naming the URL and ``what``."""
    if url.startswith("pipe:"):
        from webdataset import gopen

        try:
            with gopen(url, "rb") as stream:
                yield stream
        except OSError as err:  # gopen raises when the command exits non-zero
            raise OSError(f"{what}: the command {url!r} failed ({err})") from err
        return
    fs, path = filesystem(url)
    try:
        # http: a streaming response (no HEAD for the size, no random access); others: the default
        stream = fs.open(path, "rb", block_size=0) if url.startswith(("http://", "https://")) else fs.open(path, "rb")
    except FileNotFoundError as err:
        cause = err.__cause__  # fsspec's http reports any failure as not found; a refused connection is not that
        if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
            raise ConnectionError(f"cannot reach {url} (the {what}): {type(cause).__name__}: {cause}") from err
        raise FileNotFoundError(f"{url} not found: the {what} is missing there") from err
    except OSError as err:
        raise ConnectionError(f"cannot reach {url} (the {what}): {type(err).__name__}: {err}") from err
    with stream:
        try:
            yield stream
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{url} not found: the {what} is missing there") from err
        except ConnectionError:
            raise
        except OSError as err:
            raise ConnectionError(f"reading {url} (the {what}) failed: {type(err).__name__}: {err}") from err


def missing_files(base: str, names: list[str]) -> list[str]:
    """The ``names`` that do not exist beside ``base`` (one listing, then one check per unlisted name).

    A ``pipe:`` store cannot be listed: nothing is reported and a missing file fails when it is read.
    """
    if base.startswith("pipe:"):
        return []
    fs, path = filesystem(base)
    try:  # an HTTP listing may be partial or absent: names it lacks are checked one by one
        listed = {str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    except Exception:  # no listing at all is fine: every name is checked on its own
        listed = set()
    return [name for name in names if name not in listed and not fs.exists(join_url(path, name))]
