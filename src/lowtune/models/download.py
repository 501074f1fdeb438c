"""Hub downloads through the real clients: `huggingface_hub.snapshot_download` and `modelscope.snapshot_download`.

Endpoints, caches and offline state come from the standard variables, read at each call (the clients read some
only once per process, so lowtune passes them explicitly):
`HF_ENDPOINT`, `HF_HUB_OFFLINE` (or the legacy `TRANSFORMERS_OFFLINE`) for Hugging Face; `MODELSCOPE_ENDPOINT`
(or the older `MODELSCOPE_DOMAIN`) and `MODELSCOPE_CACHE` for ModelScope. ModelScope has no offline variable of its
own, so `HF_HUB_OFFLINE=1` means "no network" for both hubs. Both clients resume an interrupted transfer with HTTP
range requests. `auto` tries the reachable hubs, Hugging Face first, and moves on when a hub lacks the repo.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from lowtune.errors import UserError, require

HUBS = ("hf", "modelscope")
HF_DEFAULT = "https://huggingface.co"
MODELSCOPE_DEFAULT = "https://www.modelscope.cn"
_TRUE = {"1", "true", "yes", "on"}


class RepoNotFound(UserError):
    """The hub answered, but has no such repo or revision."""


def is_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT).rstrip("/")


def modelscope_endpoint() -> str:
    url = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or MODELSCOPE_DEFAULT
    url = url.strip()
    return (url if url.startswith(("http://", "https://")) else f"https://{url}").rstrip("/")


def endpoint(hub: str) -> str:
    return hf_endpoint() if hub == "hf" else modelscope_endpoint()


def reachable(hub: str, timeout: float = 3.0) -> bool:
    """True when the hub's endpoint answers HTTP at all (any status counts: the server is there)."""
    return answers(endpoint(hub), timeout)


def answers(url: str, timeout: float = 3.0) -> bool:
    """True when `url` answers HTTP at all (any status counts)."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "lowtune"})
    try:
        urllib.request.urlopen(request, timeout=timeout).close()  # noqa: S310 - a configured hub URL
        return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def pick_hubs(hub: str, timeout: float = 3.0) -> list[str]:
    """Hubs to try in order: the one asked for, or for `auto` every reachable hub (Hugging Face first)."""
    if hub not in (*HUBS, "auto"):
        raise UserError(f"--hub must be hf, modelscope or auto (got '{hub}')")
    if hub != "auto":
        return [hub]
    if is_offline():
        return list(HUBS)  # cache lookups only; no probing
    with ThreadPoolExecutor(len(HUBS)) as pool:
        alive = dict(zip(HUBS, pool.map(lambda h: reachable(h, timeout), HUBS)))
    found = [h for h in HUBS if alive[h]]
    if not found:
        raise UserError(f"no hub reachable ({hf_endpoint()}, {modelscope_endpoint()}); check the network or set "
                        "HF_ENDPOINT / MODELSCOPE_ENDPOINT to a mirror, or give a local folder")
    return found


def download(repo_id: str, hub: str = "auto", revision: str | None = None, out_dir: str | Path | None = None,
             repo_type: str = "model") -> Path:
    """Fetch a repo snapshot and return its local folder (`out_dir`, else the hub client's cache)."""
    errors: list[str] = []
    for name in pick_hubs(hub):
        try:
            fetch = _hf_snapshot if name == "hf" else _modelscope_snapshot
            return Path(fetch(repo_id, revision, out_dir, repo_type))
        except RepoNotFound as exc:
            errors.append(str(exc))
    raise RepoNotFound("; ".join(errors) + " (check the id and --revision, or try the other --hub)")


def _hf_snapshot(repo_id: str, revision: str | None, out_dir: str | Path | None, repo_type: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = is_offline()
    try:
        with _hf_offline_state(offline):
            return snapshot_download(repo_id, repo_type=repo_type, revision=revision, endpoint=hf_endpoint(),
                                     local_dir=str(out_dir) if out_dir else None, local_files_only=offline)
    except RevisionNotFoundError:
        raise RepoNotFound(f"hf: '{repo_id}' has no revision '{revision}'") from None
    except RepositoryNotFoundError:
        raise RepoNotFound(f"hf: no repo '{repo_id}' at {hf_endpoint()}") from None
    except LocalEntryNotFoundError:
        if offline:
            raise RepoNotFound(f"hf: '{repo_id}' is not in the local cache and HF_HUB_OFFLINE=1 forbids the "
                               "network; unset HF_HUB_OFFLINE or give a local folder") from None
        raise UserError(f"hf: cannot reach {hf_endpoint()} to fetch '{repo_id}'; check the network or set "
                        "HF_ENDPOINT to a mirror (e.g. https://hf-mirror.com)") from None
    except HfHubHTTPError as exc:
        raise UserError(f"hf: {str(exc).splitlines()[0]}") from None


@contextmanager
def _hf_offline_state(offline: bool) -> Iterator[None]:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import; make its switch follow the variable now."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _modelscope_snapshot(repo_id: str, revision: str | None, out_dir: str | Path | None, repo_type: str) -> str:
    require("modelscope", "hub", "Downloading from ModelScope")
    from modelscope import snapshot_download

    offline = is_offline()
    try:
        return snapshot_download(repo_id=repo_id, repo_type=repo_type, revision=revision or "master",
                                 endpoint=modelscope_endpoint(), local_files_only=offline,
                                 cache_dir=os.environ.get("MODELSCOPE_CACHE") or None,
                                 local_dir=str(out_dir) if out_dir else None)
    except Exception as exc:  # the client raises requests / modelscope_hub errors; classify by what they say
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 404 or "not exist" in text.lower() or type(exc).__name__ == "NotExistError":
            raise RepoNotFound(f"modelscope: no repo '{repo_id}' (revision {revision or 'master'}) at "
                               f"{modelscope_endpoint()}") from None
        if offline:
            raise RepoNotFound(f"modelscope: '{repo_id}' is not in the local cache and HF_HUB_OFFLINE=1 forbids "
                               "the network; unset it or give a local folder") from None
        if not reachable("modelscope"):
            raise UserError(f"modelscope: cannot reach {modelscope_endpoint()} to fetch '{repo_id}'; check the "
                            "network or set MODELSCOPE_DOMAIN to a mirror") from None
        raise UserError(f"modelscope: {text}") from None
