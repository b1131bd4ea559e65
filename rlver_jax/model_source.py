"""Model sources: a local HF directory or a Hugging Face hub id (`Qwen/Qwen2.5-7B-Instruct`,
optionally `@revision`), resolved to a local directory.

Hub ids go through `huggingface_hub.snapshot_download`, limited to the files the project
reads (config, safetensors weights, tokenizer), so HF_HOME / HF_HUB_CACHE pick the cache and
HF_HUB_OFFLINE=1 serves the cache only.
"""

from __future__ import annotations

import os
import re

# What loading a Qwen2 model and its tokenizer reads; no *.bin / *.pt / *.gguf.
ALLOW_PATTERNS = ("config.json", "generation_config.json", "*.safetensors",
                  "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                  "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                  "chat_template.jinja", "chat_template.json")

# owner/name[@revision]: hub names are letters, digits, '-', '_', '.'; no leading '.'.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(@(?P<rev>[\w./-]+))?$")


class ModelSourceError(FileNotFoundError):
    """A model source is neither a local directory nor a hub id that can be had."""


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `spec` reads as a hub id and is not a local path, else None."""
    spec = os.fspath(spec)
    if os.path.exists(os.path.expanduser(spec)) or spec.startswith((".", "~", "/")):
        return None
    m = _HUB_ID.match(spec)
    return (m["repo"], m["rev"]) if m else None


def looks_like_hub_id(spec: str) -> bool:
    return parse_hub_id(spec) is not None


def resolve_model_dir(spec: str, what: str = "model") -> str:
    """A local directory holding `spec`'s files: `spec` itself when it is a directory, else
    the hub snapshot (downloaded unless HF_HUB_OFFLINE is set). `what` names the source in
    errors, e.g. "config.policy.hf_dir"."""
    spec = os.fspath(spec)
    local = os.path.expanduser(spec)
    if os.path.isdir(local):
        return local
    hub = parse_hub_id(spec)
    if hub is None:
        raise ModelSourceError(f"{what}: model directory not found: {spec}")
    repo_id, revision = hub
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        return snapshot_download(repo_id, revision=revision,
                                 allow_patterns=list(ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:
        rev = f" at revision {revision}" if revision else ""
        if constants.HF_HUB_OFFLINE:
            raise ModelSourceError(
                f"{what}: hub model {repo_id}{rev} is not in the Hugging Face cache "
                f"{constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is set; download it once "
                f"with network access (`hf download {repo_id}`), point HF_HUB_CACHE at a "
                "cache that holds it, or pass a local directory") from e
        raise ModelSourceError(
            f"{what}: cannot download hub model {repo_id}{rev} and it is not cached in "
            f"{constants.HF_HUB_CACHE} ({type(e).__name__}); check the network or pass a "
            "local directory") from e
    except (HFValidationError, OSError, ValueError) as e:
        # RepositoryNotFoundError / RevisionNotFoundError are OSErrors (HTTP errors).
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(f"{what}: cannot resolve hub model {spec}: {first}") from e
