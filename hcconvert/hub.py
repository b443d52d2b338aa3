"""Publishing a converted checkpoint to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError, first_line


def push(directory: Path, repo_id: str, private: bool) -> str:
    """Create REPO (if needed) and upload the directory; the token comes from the HF env."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(directory), repo_id=repo_id,
                                   commit_message="Upload hcconvert reduced checkpoint")
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise UserError(f"push to {repo_id} failed: {first_line(err)}") from None
    print(f"pushed to https://huggingface.co/{repo_id}")
    return commit.commit_url
