"""Which commit of a hub repository a run reads, so that a model or dataset updated on the hub is another run.

A hub id names a branch (``main`` unless ``revision`` says otherwise), and a branch moves: a fixed chat template,
re-uploaded weights or corrected answers change the numbers under the same id. So the identity records the
commit, and an online run loads exactly that commit (a commit never moves). Offline, the commit is the one the
local cache's ref points at, which is what the libraries load offline anyway, so the load is left as it was.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from kvbench.errors import KVBenchError

COMMIT = re.compile(r"[0-9a-f]{40}")


def _cached_commit(repo_id: str, revision: str, repo_type: str) -> str | None:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "refs" / revision
    try:
        text = ref.read_text().strip()
    except OSError:
        return None
    return text if COMMIT.fullmatch(text) else None


def commit(repo_id: str, revision: str | None = None, repo_type: str = "model") -> str | None:
    """The commit ``(repo_id, revision)`` resolves to: a full commit hash as given; online, the hub's answer;
    offline (or when the hub does not answer), the local cache's ref; None when neither knows (the load then fails
    with its own error). Asked once per process, so a run's identity and its load agree."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise KVBenchError(
            f"'{repo_id}' is neither an existing directory nor a hub id (name or namespace/name); "
            "check the spelling, or give the path of a local directory"
        ) from exc
    return _resolved(repo_id, "main" if revision is None else str(revision), repo_type)


@functools.lru_cache(maxsize=64)
def _resolved(repo_id: str, revision: str, repo_type: str) -> str | None:
    from huggingface_hub import HfApi, constants

    if COMMIT.fullmatch(revision):
        return revision
    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=10).sha
        except Exception:  # no network, no access, no such revision: what the cache says, if anything
            pass
    return _cached_commit(repo_id, revision, repo_type)


def forget() -> None:
    """Resolve again on the next call (a long-lived process that wants to see a branch move)."""
    _resolved.cache_clear()


def load_revision(repo_id: str, revision: str | None = None, repo_type: str = "model") -> str | None:
    """What to pass as ``revision=`` when loading: the recorded commit when online; offline, the revision as given
    (the cache resolves it to the same commit)."""
    from huggingface_hub import constants

    revision = None if revision is None else str(revision)
    if constants.HF_HUB_OFFLINE:
        return revision
    return commit(repo_id, revision, repo_type) or revision
