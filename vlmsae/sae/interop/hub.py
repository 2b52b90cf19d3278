"""``hf://<org>/<repo>[/<subfolder>][@<revision>]``: a published SAE on the Hugging Face Hub, as a local path.

    resolve_hf("hf://mateuszpach/sae-for-vlm/some/folder")          # -> <HF cache>/.../snapshots/<commit>/some/folder
    resolve_hf("hf://org/repo/folder@v1.0")                           # a branch, tag or commit hash

Files go through huggingface_hub into its cache (:func:`hub_cache_dpath`); only the subfolder is fetched, or for
a file path (``.../checkpoints/ae_100000.pt``) that file plus the ``config.json``/``cfg.json`` one and two folders
up (where dictionary_learning keeps the config of its checkpoints). With ``HF_HUB_OFFLINE=1`` (read at each call)
only the cache is read, and a miss fails with the command that fills it on a machine with a network.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

HF_SCHEME = "hf://"
_TRUE = {"1", "true", "yes", "on"}
_FILE_SUFFIX = re.compile(r"\.(pt|pth|bin|safetensors|json|npz|npy|ckpt)$")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMPANIONS = ("config.json", "cfg.json")


def is_hf_uri(path: object) -> bool:
    return isinstance(path, str) and path.startswith(HF_SCHEME)


@dataclass(frozen=True)
class HubPath:
    """A parsed ``hf://`` path: ``repo_id`` (org/repo), ``subfolder`` ("" = the whole repo), ``revision``."""

    repo_id: str
    subfolder: str
    revision: str | None

    @property
    def is_file(self) -> bool:
        return bool(_FILE_SUFFIX.search(self.subfolder))

    def allow_patterns(self) -> list[str] | None:
        """What to fetch: the subfolder (recursively), or a file and the configs beside and above it."""
        if not self.subfolder:
            return None
        if not self.is_file:
            return [f"{self.subfolder}/**"]
        parents = [str(Path(self.subfolder).parent), str(Path(self.subfolder).parent.parent)]
        extra = [name if parent == "." else f"{parent}/{name}" for parent in parents for name in _COMPANIONS]
        return [self.subfolder, *dict.fromkeys(extra)]

    def fill_command(self) -> str:
        """Shell and Python commands that put this path into the cache (run them where there is a network)."""
        rev = f" --revision {self.revision}" if self.revision else ""
        patterns = self.allow_patterns()
        include = "".join(f' --include "{p}"' for p in patterns or [])
        py_rev = f", revision={self.revision!r}" if self.revision else ""
        py_pat = f", allow_patterns={patterns!r}" if patterns else ""
        return (
            f"hf download {self.repo_id}{rev}{include}   (huggingface-cli download with the same arguments on "
            f'huggingface_hub < 1.0), or python -c "from huggingface_hub import snapshot_download; '
            f'snapshot_download({self.repo_id!r}{py_rev}{py_pat})"'
        )


def parse_hf_uri(uri: str) -> HubPath:
    """Split ``hf://org/repo[/sub/folder][@revision]``; a malformed path is refused naming it and the form."""
    form = "hf://<org>/<repo>[/<subfolder>][@<revision>]"
    if not is_hf_uri(uri):
        raise ValueError(f"{uri!r} is not an hf:// path; expected {form}.")
    body, _, revision = uri[len(HF_SCHEME) :].partition("@")
    parts = body.strip("/").split("/")
    if len(parts) < 2 or any(not _SEGMENT.match(part) or part in {".", ".."} for part in parts):
        raise ValueError(
            f"{uri!r} is not a valid hf:// path: expected {form}, with an org, a repo and optional subfolder names "
            "made of letters, digits, '.', '_' and '-' (no empty parts, no '..')."
        )
    if "@" in uri and not revision:
        raise ValueError(f"{uri!r} has an empty revision after '@': name a branch, tag or commit, or drop the '@'.")
    return HubPath(repo_id="/".join(parts[:2]), subfolder="/".join(parts[2:]), revision=revision or None)


def hub_cache_dpath() -> Path:
    """The Hub cache folder now: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def folder_listing(dpath: Path) -> list[str]:
    """The names in folder ``dpath`` (folders with a trailing "/"), sorted; [] when it is no folder (for messages)."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in dpath.iterdir()) if dpath.is_dir() else []


def resolve_hf(uri: str) -> Path:
    """The local path of ``uri`` in the Hub cache, downloading it first unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import errors, snapshot_download

    hub = parse_hf_uri(uri)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE  # now, not at huggingface_hub's import
    cache_dpath = hub_cache_dpath()
    fill = f"On a machine with a network run: {hub.fill_command()}; then copy {cache_dpath} here (or point " + (
        "HF_HUB_CACHE at the copy)."
    )
    try:
        snapshot = snapshot_download(
            hub.repo_id,
            revision=hub.revision,
            allow_patterns=hub.allow_patterns(),
            cache_dir=str(cache_dpath),
            local_files_only=offline,
        )
    except errors.RevisionNotFoundError as err:
        raise FileNotFoundError(
            f"{uri!r}: the Hub repo {hub.repo_id!r} has no revision {hub.revision!r}; name an existing branch, tag "
            "or commit after '@'."
        ) from err
    except errors.RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"{uri!r}: no Hub model repo {hub.repo_id!r} (or it is private/gated: log in with `hf auth login`). "
            "Check the org/repo spelling."
        ) from err
    except errors.LocalEntryNotFoundError as err:
        where = "HF_HUB_OFFLINE=1, so only the cache was searched" if offline else "the Hub could not be reached"
        raise FileNotFoundError(
            f"{uri!r} is not in the Hugging Face cache {str(cache_dpath)!r} ({where}). {fill}"
        ) from err
    except errors.HfHubHTTPError as err:
        raise FileNotFoundError(f"{uri!r}: the Hub refused the download ({err}).") from err
    local = Path(snapshot) / hub.subfolder if hub.subfolder else Path(snapshot)
    if not local.exists():
        near = folder_listing(Path(snapshot) / Path(hub.subfolder).parent)
        listing = f" Next to it: {near}." if near else ""
        if offline:
            raise FileNotFoundError(
                f"{uri!r}: {hub.subfolder!r} is not in the cached snapshot {str(snapshot)!r} (HF_HUB_OFFLINE=1, "
                f"so only the cache was searched).{listing} {fill}"
            )
        raise FileNotFoundError(
            f"{uri!r} does not exist: the Hub repo {hub.repo_id!r} at revision {hub.revision or 'main'!r} has no "
            f"{hub.subfolder!r}.{listing} Check the subfolder path."
        )
    return local
