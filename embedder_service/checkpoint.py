"""Where a checkpoint comes from, checked before torch and transformers load.

These checks need neither (they take seconds to import), so a mistyped
directory or an unreachable hub stops start-up at once, with one message.
"""
from __future__ import annotations

import os
import socket
import urllib.parse


class ModelLoadError(RuntimeError):
    """The checkpoint could not be loaded; the message says what to do."""


def locate(name: str, revision: str = "") -> dict:
    """The `from_pretrained` arguments that load `name` at `revision` (empty:
    the hub's default): from the local cache only, when it holds it. Raises
    ModelLoadError for a path that is no directory, a revision asked of a
    directory, or a hub id neither cached nor reachable."""
    directory = os.path.expanduser(name)
    if os.path.isdir(directory):
        _check_directory(name, directory, revision)
        return {"local_files_only": False, "revision": None}
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        # Written as a path: transformers would try it as a hub id and answer
        # with the hub's naming rules.
        raise ModelLoadError(
            f"no such directory: {name}\nWhat to do: pass --model (or EMBEDDER_MODEL) a directory "
            "written by CLIPModel.save_pretrained, or a hub id such as "
            "openai/clip-vit-base-patch32")
    return {"local_files_only": _in_cache_or_reachable(name, revision or None),
            "revision": revision or None}


def _check_directory(name: str, directory: str, revision: str) -> None:
    """A directory has no revisions, so asking for one is a mistake, and one
    without config.json (an empty volume, say) holds no checkpoint."""
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ModelLoadError(
            f"cannot load CLIP checkpoint {name!r}: the directory has no config.json\n"
            "What to do: pass --model (or EMBEDDER_MODEL) a directory written by "
            "CLIPModel.save_pretrained (config.json, weights, tokenizer and "
            "preprocessor_config.json), or a hub id such as openai/clip-vit-base-patch32")
    if revision:
        raise ModelLoadError(
            f"--model-revision {revision} applies to hub ids, and {name} is a local directory\n"
            "What to do: drop --model-revision (EMBEDDER_MODEL_REVISION): a directory's "
            "weights are whatever it holds")


def _in_cache_or_reachable(name: str, revision: str | None, timeout_s: float = 3.0) -> bool:
    """For a hub id: True when the checkpoint is in the local cache (it then
    loads from there, with no network call, so a restart never changes the
    weights). When it is not, make sure the hub answers at all, or fail in
    seconds with one message instead of a minute of download retries."""
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return True
    if constants.HF_HUB_OFFLINE:
        return False  # transformers says what is missing from the cache
    host = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=timeout_s).close()
    except OSError as exc:
        raise ModelLoadError(
            f"{name} is not in the Hugging Face cache and {constants.ENDPOINT} cannot be reached "
            f"to download it ({exc.strerror or exc})\nWhat to do: on a machine without the hub, "
            "fill the cache first (HF_HOME) and set HF_HUB_OFFLINE=1, or pass --model a local "
            "directory written by save_pretrained") from exc
    return False


def public_name(name: str) -> str:
    """The name a checkpoint is shown under: a hub id as given, a local
    directory by its base name, so that no local path leaves the process."""
    return os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name
