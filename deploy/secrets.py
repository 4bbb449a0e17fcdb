"""Secrets on disk: private workspaces and the key files of a provisioning workspace."""

from __future__ import annotations

import logging
import os

from deploy.processes import DeploymentError

logger = logging.getLogger(f"fedbrats.{__name__}")

# ---- secrets on disk ---------------------------------------------------------------------------------------------
#: Files of a provisioning workspace that hold private keys: NVFlare's ``state/cert.json`` holds the root CA's private
#: key (whoever reads it can mint certificates for the federation), ``*.key`` the participants' keys.
_SECRET_SUFFIXES = (".key", ".pfx")


def default_workspace(name: str) -> str:
    """A per-user default workspace under the temporary folder (``<tmp>/<name>-<uid>``).

    A fixed, shared name would put one user's root CA where every local user can read it, or let another user
    prepare the folder in advance.
    """
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"{name}-{os.getuid()}")


def make_private_dir(path: str) -> str:
    """Create ``path`` (and its parents) or take it over, readable by this user only (mode 0700).

    Raises:
        DeploymentError: ``path`` is a symbolic link, not a folder, or belongs to another user.
    """
    path = os.path.abspath(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if os.path.islink(path) or not os.path.isdir(path):
        raise DeploymentError(f"workspace {path} is a link or not a folder; choose another --workspace")
    if info.st_uid != os.getuid():
        raise DeploymentError(
            f"workspace {path} belongs to user id {info.st_uid}, not to you; it would hold your federation's keys, "
            "so choose another --workspace"
        )
    os.chmod(path, 0o700)
    return path


def restrict_secrets(root: str) -> list[str]:
    """Make every key file under ``root`` mode 0600 and NVFlare's ``state`` folders 0700; return the files changed.

    NVFlare writes ``state/cert.json`` (the root CA with its private key) 0644 in 0755 folders.
    """
    changed: list[str] = []
    for folder, _dirs, files in os.walk(root):
        if os.path.basename(folder) == "state":
            os.chmod(folder, 0o700)
        for name in files:
            path = os.path.join(folder, name)
            secret = name.endswith(_SECRET_SUFFIXES) or (name == "cert.json" and os.path.basename(folder) == "state")
            if secret and not os.path.islink(path) and os.stat(path).st_mode & 0o077:
                os.chmod(path, 0o600)
                changed.append(path)
    if changed:
        logger.info("restricted %d key file(s) under %s to mode 0600", len(changed), root)
    return changed
