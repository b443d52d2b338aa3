"""Talking to the Hugging Face Hub: errors as one line, offline detection, push and its preflight.

Every Hub call goes through `hub_errors`, so offline, 401, 404 or a rate limit end the run with
one line instead of a library traceback.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError, first_line

# Seconds the reachability probe waits: long enough for a slow link, short enough that an
# offline run fails at once rather than after huggingface_hub's half minute of retries.
PROBE_TIMEOUT = 5.0
# Organization roles that may create and write repos.
WRITE_ROLES = ("admin", "write", "contributor")


def client_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the HTTP client huggingface_hub uses that are no
    OSError: httpx's and httpx2's (huggingface_hub 1.x and 2.x; requests' are OSErrors)."""
    errors: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def describe_hub_error(err: BaseException) -> str:
    """The cause of a failed Hub call in a few words."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = "offline (HF_HUB_OFFLINE is set, or the Hub is unreachable)"
    if isinstance(err, LocalEntryNotFoundError):
        return f"{offline} and not in the HF cache"
    if isinstance(err, OfflineModeIsEnabled):
        return offline
    if isinstance(err, GatedRepoError):
        return "the repo is gated: accept its terms on the Hub and set HF_TOKEN"
    if isinstance(err, RepositoryNotFoundError):
        return "no such repo, or it is private and the token cannot see it"
    if isinstance(err, RevisionNotFoundError):
        return "no such revision"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status == 401:
        return "the Hub rejected the token (401): check HF_TOKEN or run `hf auth login`"
    if isinstance(err, HfHubHTTPError) and status == 429:
        return "rate limited by the Hub (429): wait a minute and try again"
    if isinstance(err, (ConnectionError, TimeoutError, *client_errors())):
        return f"cannot reach the Hub ({first_line(err)})"
    return first_line(err)


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Any failure of the Hub calls inside becomes one UserError: '{what}: {cause}'."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, *client_errors()) as err:  # HfHubHTTPError is an OSError
        raise UserError(f"{what}: {describe_hub_error(err)}") from None


def go_offline_if_unreachable() -> bool:
    """One quick request to the Hub; when it cannot connect, switch huggingface_hub to offline
    mode, so that what follows uses the HF cache at once instead of retrying with backoff for
    half a minute. True when offline. Meant for the command line: it changes the process-wide
    setting."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT)
    except (OSError, *client_errors()):
        constants.HF_HUB_OFFLINE = True
    return constants.is_offline_mode()


def check_push(repo_id: str) -> None:
    """What --push-to-hub needs, checked before the conversion starts: a valid repo id, a token
    the Hub accepts, and write access to the repo's namespace."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise UserError(f"--push-to-hub {repo_id!r} is not a valid repo id: "
                        f"{first_line(err)}") from None
    token = get_token()
    if token is None:
        raise UserError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run "
                        "`hf auth login`")
    with hub_errors(f"--push-to-hub {repo_id}"):
        account = HfApi().whoami(token)
    _check_write_access(account, repo_id)


def _check_write_access(account: dict, repo_id: str) -> None:
    """Refuse a read-only token, or a namespace that is neither the user's nor one of their
    organizations with a writing role (from the /whoami-v2 answer)."""
    user = account.get("name")
    namespace = repo_id.split("/")[0] if "/" in repo_id else user
    token = account.get("auth", {}).get("accessToken", {})
    if token.get("role") == "read":
        raise UserError(f"--push-to-hub {repo_id}: the token is read-only; create a write token")
    if token.get("role") == "fineGrained" and not _fine_grained_can_write(token, repo_id,
                                                                          namespace):
        raise UserError(f"--push-to-hub {repo_id}: the fine-grained token has no write "
                        f"permission for {namespace}")
    roles = {org.get("name"): org.get("roleInOrg") for org in account.get("orgs", [])}
    if namespace != user and roles.get(namespace) not in WRITE_ROLES:
        raise UserError(f"--push-to-hub {repo_id}: {user} cannot write to {namespace!r} "
                        "(not your account or an organization where you may write)")


def _fine_grained_can_write(token: dict, repo_id: str, namespace: str) -> bool:
    scopes = token.get("fineGrained", {}).get("scoped", [])
    return any("repo.write" in scope.get("permissions", [])
               and scope.get("entity", {}).get("name") in (namespace, repo_id)
               for scope in scopes)


def push(directory: Path, repo_id: str, private: bool) -> str:
    """Create REPO (if needed) and upload the directory; the token comes from the HF env."""
    from huggingface_hub import HfApi

    api = HfApi()
    with hub_errors(f"push to {repo_id} failed"):
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(directory), repo_id=repo_id,
                                   commit_message="Upload hcconvert reduced checkpoint")
    print(f"pushed to {url}")
    return commit.commit_url
