"""SAEs on the Hugging Face Hub: upload (several hookpoints in one repo) and download of one hookpoint.

Uploads go through :class:`huggingface_hub.HfApi` (``create_repo`` then ``upload_folder`` of a folder written by
:func:`hf_dataselect.sae.io.save_sae`, with a model card for every hookpoint in it). Downloads use
``snapshot_download`` with ``allow_patterns`` restricted to the requested hookpoint's files, so a repo holding
dozens of layers costs only the one that is used.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_dataselect.errors import InputError

if TYPE_CHECKING:
    from hf_dataselect.sae.model import TopKSAE


def push_to_hub(
    repo_id: str,
    saes: dict[str, TopKSAE] | str | os.PathLike,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    license: str | None = None,
) -> str:
    """Upload SAEs to the model repo ``repo_id`` (created if needed) in one commit; returns the commit URL.

    ``saes``: ``{hookpoint: TopKSAE}``, or a folder written by ``save_pretrained`` / ``train_sae(output_dir=)``
    holding one or more hookpoint folders. The upload holds each hookpoint's SAE files and a ``README.md``
    model card rendered for the repo (its usage snippet loads ``repo_id``). Hookpoints already in the repo that
    are not part of this upload are left untouched (the card then describes the uploaded ones).
    """
    from huggingface_hub import HfApi

    from hf_dataselect.sae.io import SAE_FILES, list_hookpoints, save_sae, write_model_card

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise InputError(f"repo_id must be 'owner/name', got {repo_id!r}.")
    if isinstance(saes, dict) and not saes:
        raise InputError("Nothing to upload: the SAE dict is empty.")
    if not isinstance(saes, dict):
        source = Path(saes)
        if not source.is_dir():
            raise InputError(f"No such folder to upload: {source}")
        if not list_hookpoints(source):
            raise InputError(f"{source} holds no SAE (no <hookpoint>/cfg.json).")
    with tempfile.TemporaryDirectory(prefix="hf_dataselect_push_") as staging_name:
        staging = Path(staging_name)
        if isinstance(saes, dict):
            for hookpoint, sae in saes.items():
                save_sae(sae, staging, hookpoint=hookpoint, model_card=False)
        else:
            for name, folder in list_hookpoints(source).items():
                for file in SAE_FILES:
                    if (folder / file).is_file():
                        _link_or_copy(folder / file, staging / name / file)
        write_model_card(staging, repo_id=repo_id, license=license)
        hookpoints = sorted(list_hookpoints(staging))
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(staging),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload SAEs for {', '.join(hookpoints)}",
            create_pr=create_pr,
        )
    return str(getattr(commit, "commit_url", commit))


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link when the file system allows it (weights can be large), else a copy."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def download_sae(
    repo_id: str, hookpoint: str | int | None, *, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """Download the files of one hookpoint of ``repo_id`` (or the top-level SAE); returns the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    from hf_dataselect.sae.activations import hookpoint_folder_candidates
    from hf_dataselect.sae.io import SAE_FILES, list_hookpoints

    prefixes = [""] if hookpoint is None else [f"{name}/" for name in hookpoint_folder_candidates(hookpoint)]
    patterns = [f"{prefix}{file}" for prefix in prefixes for file in SAE_FILES]
    try:
        folder = Path(
            snapshot_download(
                repo_id, allow_patterns=patterns, revision=revision, token=token, repo_type="model"
            )
        )
    except RepositoryNotFoundError as err:
        raise InputError(f"SAE repo {repo_id!r} not found on the Hub (or it is private): {err}") from err
    except LocalEntryNotFoundError as err:
        raise InputError(
            f"Cannot download {repo_id!r}: offline and not in the local cache ({err}). Connect, or pass a local "
            "folder."
        ) from err
    except HfHubHTTPError as err:
        raise InputError(f"Downloading {repo_id!r} failed: {err}") from err
    if hookpoint is not None and not any((folder / p / "cfg.json").is_file() for p in prefixes):
        raise InputError(
            f"Hub repo {repo_id} has no SAE for hookpoint {str(hookpoint)!r}; hookpoints it holds: "
            f"{repo_hookpoints(repo_id, revision=revision, token=token)}."
        )
    if hookpoint is None and not (folder / "cfg.json").is_file():
        available = repo_hookpoints(repo_id, revision=revision, token=token) or sorted(
            list_hookpoints(folder)
        )
        if len(available) == 1:
            return download_sae(repo_id, available[0], revision=revision, token=token)
        raise InputError(
            f"Hub repo {repo_id} holds SAEs for hookpoints {available}; choose one with hookpoint=."
        )
    return folder


def repo_hookpoints(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None
) -> list[Any]:
    """Hookpoint folders of a Hub repo (folders holding a ``cfg.json``); empty when the Hub cannot be asked."""
    from huggingface_hub import HfApi

    try:
        files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except Exception:  # offline or no access: the caller's message says what was looked for
        return []
    return sorted(f.rsplit("/", 1)[0] for f in files if f.endswith("/cfg.json"))


__all__ = ["download_sae", "push_to_hub", "repo_hookpoints"]
