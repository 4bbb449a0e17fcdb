"""Production provisioning and startup kits: the project file, each site's local settings, running a job, clean-up.

The one project file is ``poc_setup/project.yml`` (server, one client per hospital, admin users, NVFlare 2.9's
default builders). :func:`local_project` turns it into a variant for one machine (the first N clients, the server
renamed to ``localhost`` so that it listens on loopback only, a free port); the PoC and the tests use that variant,
so what is rehearsed is what the hospitals receive.

A site's data never comes from the job: :func:`write_site_configs` writes each site's entry of a ``sites.json`` into
its startup kit's ``local/fedbrats_site.json``, where the site's trainer looks first (after the environment
variable ``FEDBRATS_SITE_CONFIG``, which is removed from the environment of every process started here).

``python -m fedbrats.deploy.provision`` rehearses a production deployment on loopback: provision, start the server
and the clients from their kits (mutual TLS), submit a job as the project admin, follow it, download the global
model, shut everything down and check that no process or port is left behind.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import copy
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from fedbrats.data.site_config import LOCAL_CONFIG_NAME, SITE_CONFIG_ENV, load_site_config
from fedbrats.federated.events import (
    ROUND_END,
    ROUND_START,
    TASK_DISPATCHED,
    EventFollower,
    is_problem,
)
from fedbrats.federated.events import describe as describe_event
from fedbrats.federated.memory import with_allocator_defaults
from fedbrats.federated.protocol import GLOBAL_MODEL_FILE, RunFolder
from fedbrats.utils import FileTail

logger = logging.getLogger(__name__)

#: The repository root (``poc_setup/`` and ``jobs/`` live there in a source checkout).
REPO_ROOT = Path(__file__).resolve().parents[3]
#: The production project file; every variant is derived from it.
PROJECT_FILE = REPO_ROOT / "poc_setup" / "project.yml"
#: Host name of the server in loopback variants: the server then binds to 127.0.0.1 only.
LOCAL_HOST = "localhost"
#: Environment variable set to a run's id in every process a run starts, to find them all again.
MARKER_ENV = "FEDBRATS_DEPLOYMENT_ID"
#: What a site adds to ``class_allow_list`` in ``local/resources.json`` to run fedbrats jobs without ``app/custom``:
#: the package, and the NVFlare class the jobs use that NVFlare 2.9's default list leaves out.
FEDBRATS_CLASS_ALLOW_LIST: tuple[str, ...] = (
    "fedbrats.",
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
)
#: Job statuses after which a job does no more work (NVFlare reports ``FINISHED:<how>`` for ended jobs).
_TERMINAL = ("FINISHED", "ABORTED", "ABANDONED", "FAILED")


class DeploymentError(RuntimeError):
    """A deployment step failed; the message says which setting or log to check."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived: the run stops everything it started and ends."""


def raise_on_termination() -> None:
    """Turn SIGTERM into :class:`Interrupted`, so that a killed run still stops what it started (``finally``)."""

    def _handler(signum: int, _frame: Any) -> None:
        raise Interrupted(f"received signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, _handler)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """While stopping, a further Ctrl-C or SIGTERM is logged instead of cutting the clean-up short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _handler(signum: int, _frame: Any) -> None:
        logger.warning("%s received while stopping; finishing the clean-up first", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---- tools, ports -----------------------------------------------------------------------------------------------
def nvflare_cli() -> str:
    """The ``nvflare`` command of this environment (next to the running Python, else on ``PATH``).

    Raises:
        DeploymentError: it is not installed.
    """
    candidate = Path(sys.executable).with_name("nvflare")
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nvflare")
    if found:
        return found
    raise DeploymentError(
        f"the 'nvflare' command is neither next to {sys.executable} nor on PATH; install NVFlare in this environment "
        "(pip install -r requirements.txt)"
    )


def listening_pids(port: int) -> list[int]:
    """Processes listening on TCP ``port`` on any address (pid 0 when the owner cannot be seen)."""
    pids = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            pids.append(conn.pid or 0)
    return pids


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``port`` (sockets still in TIME_WAIT do not count)."""
    try:
        if listening_pids(port):
            return False
    except psutil.AccessDenied:
        pass
    for address in (host, "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


def find_free_port(host: str = "127.0.0.1", avoid: Iterable[int] = ()) -> int:
    """A TCP port nothing listens on now (the OS picks it; it is free at run time, not reserved)."""
    avoid = set(avoid)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in avoid and port_is_free(port, host):
            return port
    raise DeploymentError(f"found no free TCP port on {host}")


def wait_for_listener(port: int, host: str, timeout: float, what: str, log_hint: str = "") -> float:
    """Wait until something accepts connections on ``host:port``; return the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return time.monotonic() - started
        time.sleep(0.5)
    raise DeploymentError(
        f"{what} is not listening on {host}:{port} after {timeout:.0f}s; check that the port is free and allowed, "
        f"and the log {log_hint or 'of ' + what}"
    )


# ---- the project file -------------------------------------------------------------------------------------------
def load_project(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read a project file (default: ``poc_setup/project.yml`` of this checkout).

    Raises:
        DeploymentError: the file is missing or not a project (no participants).
    """
    path = Path(path) if path else PROJECT_FILE
    if not path.is_file():
        raise DeploymentError(
            f"project file {path} does not exist; pass --project with the path of poc_setup/project.yml"
        )
    with open(path, encoding="utf-8") as f:
        project = yaml.safe_load(f)
    if not isinstance(project, dict) or not isinstance(project.get("participants"), list):
        raise DeploymentError(f"project file {path} has no 'participants' list; is it an NVFlare project.yml?")
    return project


def _participants(project: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    return [p for p in project["participants"] if p.get("type") == kind]


def server_name(project: Mapping[str, Any]) -> str:
    """The server participant's name (its host name)."""
    servers = _participants(project, "server")
    if len(servers) != 1:
        raise DeploymentError(f"the project needs exactly one server participant, found {len(servers)}")
    return servers[0]["name"]


def client_names(project: Mapping[str, Any]) -> list[str]:
    """The client (site) names, in the file's order."""
    return [p["name"] for p in _participants(project, "client")]


def project_admin(project: Mapping[str, Any]) -> str:
    """The one admin with role ``project_admin`` (it has the bring-your-own-code right)."""
    admins = [p["name"] for p in _participants(project, "admin") if p.get("role") == "project_admin"]
    if len(admins) != 1:
        raise DeploymentError(f"the project needs exactly one admin with role project_admin, found {admins}")
    return admins[0]


def local_project(
    project: Mapping[str, Any],
    num_sites: int,
    port: int,
    *,
    server_host: str = LOCAL_HOST,
    name: str | None = None,
) -> dict[str, Any]:
    """The project for one machine: the first ``num_sites`` clients, the server at ``server_host:port``.

    Clients beyond those of the file are added as ``site-<k>`` of org ``hospital_<k>``. Org admins of orgs without
    a remaining client are dropped; the other admins stay. The port serves both the clients and the admins.

    Args:
        project: the production project (:func:`load_project`).
        num_sites: number of FL clients.
        port: the server's port (``fed_learn_port``).
        server_host: the server's name, which is also the host its certificate is made for.
        name: project name (default: the file's).
    """
    if num_sites < 1:
        raise DeploymentError(f"the number of sites must be >= 1, got {num_sites}")
    out = copy.deepcopy(dict(project))
    if name:
        out["name"] = name
    server_name(out)  # exactly one
    clients = _participants(out, "client")[:num_sites]
    for k in range(len(clients) + 1, num_sites + 1):
        clients.append({"name": f"site-{k}", "type": "client", "org": f"hospital_{k}"})
    orgs = {c.get("org") for c in clients}
    participants = []
    for p in out["participants"]:
        kind = p.get("type")
        if kind == "server":
            p = {k: v for k, v in p.items() if k not in ("admin_port", "host_names", "default_host")}
            p.update(name=server_host, fed_learn_port=int(port))
            participants.append(p)
        elif kind == "admin" and (p.get("role") != "org_admin" or p.get("org") in orgs):
            participants.append(p)
        elif kind not in ("client", "admin"):
            participants.append(p)
    servers = [p for p in participants if p.get("type") == "server"]
    others = [p for p in participants if p.get("type") != "server"]
    out["participants"] = servers + clients + others
    return out


def write_project(project: Mapping[str, Any], path: str | os.PathLike[str]) -> str:
    """Write a project file and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(dict(project), f, sort_keys=False)
    return str(path)


# ---- startup kits -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kits:
    """The startup kits of one provisioning (``<workspace>/<project>/prod_NN``).

    Attributes:
        prod_dir: the folder holding one kit per participant.
        server: the server's name (and kit folder).
        clients: the clients' names.
        admin: the project admin's name.
    """

    prod_dir: str
    server: str
    clients: tuple[str, ...]
    admin: str

    @classmethod
    def from_project(cls, prod_dir: str, project: Mapping[str, Any]) -> Kits:
        """The kits of ``project`` under ``prod_dir`` (checked to exist)."""
        kits = cls(prod_dir, server_name(project), tuple(client_names(project)), project_admin(project))
        for participant in (kits.server, kits.admin, *kits.clients):
            if not os.path.isdir(os.path.join(prod_dir, participant, "startup")):
                raise DeploymentError(f"startup kit {os.path.join(prod_dir, participant)} is missing")
        return kits

    def dir(self, participant: str) -> str:
        """The kit folder of a participant."""
        return os.path.join(self.prod_dir, participant)

    @property
    def client_dirs(self) -> dict[str, str]:
        """Client name -> kit folder."""
        return {c: self.dir(c) for c in self.clients}

    @property
    def services(self) -> list[str]:
        """Server and clients (the participants that run a process)."""
        return [self.server, *self.clients]


def latest_prod_dir(workspace: str, project_name: str) -> str:
    """The newest ``prod_NN`` folder a provisioning wrote for ``project_name`` under ``workspace``."""
    root = Path(workspace) / project_name
    prods = sorted((p for p in root.glob("prod_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    if not prods:
        raise DeploymentError(f"no startup kits (prod_NN) under {root}")
    return str(prods[-1])


def run_cli(args: Sequence[str], env: Mapping[str, str], what: str, timeout: float = 300.0) -> str:
    """Run an ``nvflare`` command; return its output (logged at debug level).

    Raises:
        DeploymentError: it failed or timed out (the message holds the end of its output).
    """
    logger.debug("running %s", " ".join(args))
    try:
        done = subprocess.run(
            list(args),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,  # Ctrl-C in the terminal reaches this run, which stops everything in order
        )
    except subprocess.TimeoutExpired as e:
        raise DeploymentError(f"{what} did not finish within {timeout:.0f}s: {' '.join(args)}") from e
    output = (done.stdout or "") + (done.stderr or "")
    for line in output.splitlines():
        logger.debug("  %s", line)
    if done.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise DeploymentError(f"{what} failed (exit code {done.returncode}): {' '.join(args)}\n{tail}")
    return output


def provision(project_file: str, workspace: str, env: Mapping[str, str] | None = None) -> Kits:
    """``nvflare provision -p project_file -w workspace``; return the kits it wrote.

    A workspace keeps its root CA (``state/``) between provisionings: provision into a new workspace to get a new CA.
    """
    project = load_project(project_file)
    os.makedirs(workspace, exist_ok=True)
    run_cli(
        [nvflare_cli(), "provision", "-p", str(project_file), "-w", str(workspace)],
        env or deployment_env(uuid.uuid4().hex),
        "provisioning",
    )
    restrict_secrets(workspace)
    return Kits.from_project(latest_prod_dir(workspace, project["name"]), project)


def admin_endpoint(admin_dir: str) -> tuple[str, int]:
    """Host and port the admin kit connects to (from ``startup/fed_admin.json``)."""
    with open(os.path.join(admin_dir, "startup", "fed_admin.json"), encoding="utf-8") as f:
        admin = json.load(f)["admin"]
    return admin["host"], int(admin["port"])


# ---- site-local settings ----------------------------------------------------------------------------------------
def make_demo_federation(out_dir: str, site_names: Sequence[str], cases_per_site: int = 10, size: int = 32) -> str:
    """Synthetic data for the named sites (the default sites' sequence profiles, repeated); return ``sites.json``."""
    from fedbrats.data.federation import DEFAULT_SITE_MODALITIES, make_synthetic_federation

    profiles = list(DEFAULT_SITE_MODALITIES.values())
    modalities = {
        name: DEFAULT_SITE_MODALITIES.get(name, profiles[i % len(profiles)]) for i, name in enumerate(site_names)
    }
    started = time.monotonic()
    manifest = make_synthetic_federation(out_dir, cases_per_site=cases_per_site, size=size, site_modalities=modalities)
    logger.info(
        "synthetic data for %s (%d cases each, %d^3) in %s (%.1fs)",
        ", ".join(site_names),
        cases_per_site,
        size,
        out_dir,
        time.monotonic() - started,
    )
    return manifest


def write_site_configs(sites_json: str, kit_dirs: Mapping[str, str]) -> dict[str, str]:
    """Write each site's entry of ``sites_json`` into its kit's ``local/fedbrats_site.json``.

    This is the site's own configuration (data path, available sequences, label convention), read by its trainer;
    the job carries none of it.

    Returns:
        site name -> path written.

    Raises:
        DeploymentError: the file lacks a site or an entry is invalid.
    """
    with open(sites_json, encoding="utf-8") as f:
        manifest = json.load(f)
    sites = manifest.get("sites", {})
    base = os.path.dirname(os.path.abspath(sites_json))
    written = {}
    for name, kit_dir in kit_dirs.items():
        if name not in sites:
            raise DeploymentError(f"{sites_json} has no entry for site {name!r} (it has {sorted(sites)})")
        entry = dict(sites[name])
        if not os.path.isabs(entry.get("datalist", "")):
            entry["datalist"] = os.path.join(base, entry.get("datalist", ""))
        path = os.path.join(kit_dir, "local", LOCAL_CONFIG_NAME)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"sites": {name: entry}}, f, indent=2)
            f.write("\n")
        try:
            cfg = load_site_config(path, name)
        except ValueError as e:
            raise DeploymentError(f"site configuration for {name} is invalid: {e}") from e
        logger.info("%s: %s (sequences %s)", name, path, ",".join(cfg.modalities))
        written[name] = path
    return written


def allow_fedbrats_classes(kit_dir: str, prefixes: Sequence[str] = FEDBRATS_CLASS_ALLOW_LIST) -> str:
    """Add ``prefixes`` to the kit's ``class_allow_list`` (written to ``local/resources.json``); return that path.

    Needed on the server and every client when jobs come without ``app/custom`` (not bring-your-own-code).
    """
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    local = os.path.join(kit_dir, "local")
    target = os.path.join(local, "resources.json")
    source = target if os.path.isfile(target) else os.path.join(local, "resources.json.default")
    with open(source, encoding="utf-8") as f:
        resources = json.load(f)
    allow = list(resources.get("class_allow_list", DEFAULT_CLASS_ALLOW_LIST))
    allow += [p for p in prefixes if p not in allow]
    resources["class_allow_list"] = allow
    with open(target, "w", encoding="utf-8") as f:
        json.dump(resources, f, indent=2)
        f.write("\n")
    return target


def stage_job(job_dir: str, staging_root: str, *, num_rounds: int | None = None, byoc: bool = True) -> str:
    """Copy a job folder for submission (the admin API writes signature files into it); return the copy.

    Args:
        job_dir: a job folder (``meta.json`` and ``app*/config``).
        staging_root: where the copy goes (``<staging_root>/<job name>``).
        num_rounds: if set, replaces ``num_rounds`` of the server workflows.
        byoc: keep ``app*/custom``; ``False`` removes it, and the sites must then allow the classes (see
            :func:`allow_fedbrats_classes`).
    """
    src = Path(job_dir)
    if not (src / "meta.json").is_file():
        raise DeploymentError(f"{job_dir} is not a job folder (no meta.json); pass --job with e.g. jobs/fedavg")
    dst = Path(staging_root) / src.name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".__nvfl_*", "__pycache__"))
    if not byoc:
        for custom in dst.glob("app*/custom"):
            shutil.rmtree(custom)
    if num_rounds is not None:
        patched = 0
        for config in dst.glob("app*/config/config_fed_server.json"):
            content = json.loads(config.read_text(encoding="utf-8"))
            for wf in content.get("workflows", []):
                if "num_rounds" in wf.get("args", {}):
                    wf["args"]["num_rounds"] = int(num_rounds)
                    patched += 1
            config.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        if not patched:
            raise DeploymentError(f"no server workflow of {job_dir} has a num_rounds argument to set")
    return str(dst)


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


# ---- processes --------------------------------------------------------------------------------------------------
def deployment_env(marker: str, home: str | None = None) -> dict[str, str]:
    """Environment for everything a run starts: tagged with ``marker``, this Python first on ``PATH``.

    ``FEDBRATS_SITE_CONFIG`` is removed, so that each site reads its own ``local/fedbrats_site.json``; the
    allocator settings of :data:`fedbrats.federated.memory.ALLOCATOR_ENV` are added where unset. ``home``
    gives the NVFlare CLI a private home (``nvflare poc`` writes ``~/.nvflare/config.conf``).
    """
    env = dict(os.environ)
    with_allocator_defaults(env)
    env.pop(SITE_CONFIG_ENV, None)
    env[MARKER_ENV] = marker
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    if home:
        os.makedirs(home, exist_ok=True)
        env["HOME"] = home
    return env


def find_processes(marker: str | None = None, paths: Iterable[str] = ()) -> list[psutil.Process]:
    """Processes tagged with ``marker``, or NVFlare processes whose command line names one of ``paths``.

    The second test finds what an earlier, killed run left (another id); it only matches NVFlare's own processes
    (``nvflare`` modules or a kit's ``startup/`` scripts), not, say, an editor open on a log. This process and its
    parents are never included.
    """
    paths = [os.path.abspath(p) for p in paths]
    own = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid in own:
            continue
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if any(p in cmdline for p in paths) and ("nvflare" in cmdline or "/startup/" in cmdline):
                found.append(proc)
                continue
            if marker and proc.environ().get(MARKER_ENV) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def describe(proc: psutil.Process) -> str:
    """``pid: command line`` of a process (for reports)."""
    try:
        return f"{proc.pid}: {' '.join(proc.cmdline())[:200]}"
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return f"{proc.pid}: (gone)"


def kill_processes(procs: Sequence[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, to each process."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


@dataclass
class CleanupReport:
    """What was left after a run had stopped its federation.

    Attributes:
        leftovers: processes still running after the orderly stop (killed then), as ``pid: command``.
        port_free: whether the server port was free at the end.
        seconds: time from the stop request until everything was gone.
    """

    leftovers: list[str] = field(default_factory=list)
    port_free: bool = True
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """Nothing had to be killed and the port is free."""
        return not self.leftovers and self.port_free


def ensure_stopped(marker: str, paths: Iterable[str], port: int | None, timeout: float = 45.0) -> CleanupReport:
    """Wait for a run's processes to end and its port to be free; kill and report what remains.

    Args:
        marker: the run's id (see :data:`MARKER_ENV`).
        paths: the run's workspace folders (a process naming one belongs to the run).
        port: the server port, or ``None``.
        timeout: seconds to wait for the orderly stop before killing.
    """
    paths = list(paths)
    started = time.monotonic()
    report = CleanupReport()
    while True:
        procs = find_processes(marker, paths)
        port_free = port is None or port_is_free(port)
        if not procs and port_free:
            break
        if time.monotonic() - started > timeout:
            report.leftovers = [describe(p) for p in procs]
            if procs:
                logger.warning("%d process(es) still running %.0fs after the stop; killing them:", len(procs), timeout)
                for line in report.leftovers:
                    logger.warning("  left behind: %s", line)
                kill_processes(procs)
            break
        time.sleep(0.5)
    if port is not None:
        deadline = time.monotonic() + 10
        while not port_is_free(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        report.port_free = port_is_free(port)
        if not report.port_free:
            owners = listening_pids(port)
            logger.error("port %d is still in use after the stop (listening pids %s)", port, owners)
    report.seconds = round(time.monotonic() - started, 2)
    return report


def start_kit(kit_dir: str, env: Mapping[str, str], timeout: float = 60.0) -> None:
    """Run a server or client kit's ``startup/start.sh`` (it starts the participant in the background).

    Output goes to ``<kit>/console.log``; the participant's own log is ``<kit>/log.txt``.
    """
    script = os.path.join(kit_dir, "startup", "start.sh")
    if not os.path.isfile(script):
        raise DeploymentError(f"{script} does not exist: is {kit_dir} a server or client startup kit?")
    with open(os.path.join(kit_dir, "console.log"), "a", encoding="utf-8") as out:
        subprocess.run(
            ["bash", script],
            cwd=kit_dir,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            start_new_session=True,
            check=True,
        )


def request_kit_stop(kit_dir: str) -> None:
    """Ask a participant's supervisor loop (``sub_start.sh``) to stop it: create ``<kit>/shutdown.fl``."""
    Path(kit_dir, "shutdown.fl").touch()


# ---- the admin session: submit, follow, download -----------------------------------------------------------------
def open_admin_session(kits: Kits, timeout: float = 30.0) -> Any:
    """Log in as the project admin with its startup kit (mutual TLS); return the NVFlare ``Session``.

    Raises:
        DeploymentError: the server cannot be reached or refuses the login; the message names host and port.
    """
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    admin_dir = kits.dir(kits.admin)
    host, port = admin_endpoint(admin_dir)
    try:
        return new_secure_session(kits.admin, admin_dir, timeout=timeout)
    except Exception as e:
        raise DeploymentError(
            f"cannot log in to the FL server at {host}:{port} as {kits.admin} (kit {admin_dir}): {e}. Check that the "
            f"server is running (its log: {kits.dir(kits.server)}/log.txt), that {host} resolves and port {port} is "
            "reachable (firewall), and that the admin kit comes from the same provisioning as the server "
            "(same startup/rootCA.pem)"
        ) from e


def connected_clients(session: Any) -> list[str]:
    """Names of the clients connected to the server now."""
    return sorted(c.name for c in session.get_system_info().client_info)


def wait_for_clients(session: Any, kits: Kits, timeout: float = 60.0) -> float:
    """Wait until every client of ``kits`` is connected; return the seconds waited."""
    started = time.monotonic()
    expected = set(kits.clients)
    connected: set[str] = set()
    while time.monotonic() - started < timeout:
        connected = set(connected_clients(session))
        if expected <= connected:
            return time.monotonic() - started
        time.sleep(1.0)
    host, port = admin_endpoint(kits.dir(kits.admin))
    missing = sorted(expected - connected)
    logs = ", ".join(os.path.join(kits.dir(c), "log.txt") for c in missing)
    raise DeploymentError(
        f"clients {missing} did not connect to the server {host}:{port} within {timeout:.0f}s; check their logs "
        f"({logs}) for TLS/certificate or connection errors, that they reach {host}:{port}, and that their kits come "
        "from the same provisioning as the server"
    )


class ServerProgressFollower:
    """Follows a job on a server of this machine: logs the workflow's progress and times its rounds.

    The progress and the round times come from the controller's round events (``round_events.jsonl`` of the job's
    run folder, see :mod:`fedbrats.federated.events`); the server's log is read only for errors of NVFlare's own
    components, which write no events.

    Args:
        run_dir: ``<server kit>/<job id>`` (the job's run folder, present while the job runs on this machine).
    """

    def __init__(self, run_dir: str) -> None:
        if not run_dir:
            raise ValueError(f"run_dir must name the job's run folder, got {run_dir!r}")
        self.run_dir = run_dir
        self._events = EventFollower(RunFolder(run_dir).round_events)
        self._log = FileTail(os.path.join(run_dir, "log.txt"))
        self._round_start: dict[int, float] = {}
        self.rounds: list[dict[str, float]] = []

    def poll(self) -> None:
        """Log what happened since the last poll and record the rounds that ended."""
        for event in self._events.poll():
            self._event(event)
        self._log_errors()

    def _event(self, event: dict[str, Any]) -> None:
        if event["event"] != TASK_DISPATCHED:  # round_start already said where the task goes
            logger.log(logging.WARNING if is_problem(event) else logging.INFO, "server: %s", describe_event(event))
        n, t = event.get("round"), float(event["time"])
        if event["event"] == ROUND_START:
            self._round_start[int(n)] = t
        elif event["event"] == ROUND_END and n in self._round_start:
            seconds = round(t - self._round_start[n], 2)
            self.rounds.append({"round": n, "seconds": seconds})
            logger.info("round %d took %.2fs", n, seconds)

    def _log_errors(self) -> None:
        """Repeat the server log's new ERROR lines of other components than the controller (it has events)."""
        for line in self._log.lines():
            # "<time> - <logger> - <LEVEL> - [<context>] - <message>" (the context is optional)
            parts = line.split(" - ", 3)
            if len(parts) < 4 or parts[2] != "ERROR" or parts[1].endswith("Controller"):
                continue
            message = parts[3].split("] - ", 1)[1] if parts[3].startswith("[") and "] - " in parts[3] else parts[3]
            logger.warning("server error (%s): %s", parts[1], message)


@dataclass
class JobOutcome:
    """How a job ended.

    Attributes:
        job_id: NVFlare's id of the job.
        status: final status (``FINISHED:COMPLETED`` when it went well).
        seconds: from submission until the end was seen.
        rounds: per training round, its duration (from the controller's round events).
    """

    job_id: str
    status: str
    seconds: float
    rounds: list[dict[str, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The job completed."""
        return self.status == "FINISHED:COMPLETED"


def is_terminal(status: str) -> bool:
    """Whether a job status is final."""
    return any(status.startswith(t) for t in _TERMINAL)


def submit_and_follow(
    session: Any,
    job_dir: str,
    *,
    server_dir: str | None = None,
    timeout: float = 3600.0,
    poll: float = 2.0,
    on_submit: Any = None,
) -> JobOutcome:
    """Submit a job and follow it to its end, logging its status changes and the workflow's round lines.

    Args:
        session: an admin session (:func:`open_admin_session`).
        job_dir: the (staged) job folder.
        server_dir: the server's kit folder when it is on this machine (for the per-round progress).
        timeout: seconds before the job is aborted.
        poll: seconds between status checks.
        on_submit: called with the job id once submitted (lets the caller abort it on interruption).

    Raises:
        DeploymentError: the job did not end within ``timeout`` (it is aborted).
    """
    started = time.monotonic()
    job_id = session.submit_job(job_dir)
    logger.info("submitted %s as job %s", os.path.basename(job_dir), job_id)
    if on_submit:
        on_submit(job_id)
    follower = ServerProgressFollower(os.path.join(server_dir, job_id)) if server_dir else None
    status = ""
    while True:
        meta = session.get_job_meta(job_id)
        if follower:
            follower.poll()
        if meta.get("status") != status:
            status = meta.get("status", "?")
            logger.info("job %s: %s (%.1fs)", job_id, status, time.monotonic() - started)
        if is_terminal(status):
            break
        if time.monotonic() - started > timeout:
            session.abort_job(job_id)
            raise DeploymentError(f"job {job_id} did not finish within {timeout:.0f}s (--timeout); it was aborted")
        time.sleep(poll)
    if follower:
        follower.poll()
    outcome = JobOutcome(job_id, status, round(time.monotonic() - started, 2), follower.rounds if follower else [])
    if not outcome.ok:
        logger.error("job %s ended with %s; details: %s", job_id, status, meta.get("job_deploy_detail", ""))
    return outcome


def download_result(session: Any, job_id: str, out_dir: str) -> tuple[str, str | None]:
    """Download a job's result into ``out_dir``; return its folder and the global model's path (if any)."""
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(os.path.abspath(out_dir), job_id)
    shutil.rmtree(target, ignore_errors=True)
    result_dir = session.download_job_result(job_id, destination=os.path.abspath(out_dir))
    models = sorted(Path(result_dir).rglob(GLOBAL_MODEL_FILE))
    model = str(models[0]) if models else None
    if model:
        logger.info("global model: %s", model)
    else:
        logger.error("the result of job %s (%s) holds no %s", job_id, result_dir, GLOBAL_MODEL_FILE)
    return result_dir, model


# ---- a whole run ------------------------------------------------------------------------------------------------
@dataclass
class RunReport:
    """What a run did and how long each step took (written to ``<output>/run_report.json``).

    Attributes:
        mode: ``poc`` or ``provisioned``.
        workspace: the run's workspace.
        port: the server port.
        sites: the clients.
        job_id: the job's id.
        status: the job's final status.
        global_model: path of the downloaded global model.
        result_dir: the downloaded job result.
        timings: seconds per step (prepare, start, clients, job, download, stop, gone) and per round.
        leftovers: processes killed after the orderly stop.
        port_free: whether the port was free at the end.
        error: what went wrong, if something did.
    """

    mode: str
    workspace: str
    port: int = 0
    sites: list[str] = field(default_factory=list)
    job_id: str = ""
    status: str = ""
    global_model: str | None = None
    result_dir: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    port_free: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        """The job completed, the model came back and nothing was left running."""
        return (
            self.status == "FINISHED:COMPLETED"
            and bool(self.global_model)
            and not self.leftovers
            and self.port_free
            and not self.error
        )


class Deployment(abc.ABC):
    """One federation on this machine: prepared, started, used for one job, stopped and checked.

    Args:
        workspace: folder for everything the run writes (created; a previous run's content is replaced).
        num_sites: number of clients (``site-1`` ... as in the project file).
        project_file: the production project file (default ``poc_setup/project.yml``).
        sites_json: an existing federation's ``sites.json``; default: synthetic data made in the workspace.
        cases_per_site: synthetic cases per site.
        size: synthetic volume size.
        port: server port; 0 picks a free one.
        byoc: submit jobs with ``app/custom`` (needs the BYOC right); ``False`` removes it and adds the fedbrats
            classes to every site's allow-list instead.
    """

    mode = "?"

    def __init__(
        self,
        workspace: str,
        num_sites: int = 2,
        *,
        project_file: str | None = None,
        sites_json: str | None = None,
        cases_per_site: int = 10,
        size: int = 32,
        port: int = 0,
        byoc: bool = True,
    ) -> None:
        self.workspace = os.path.abspath(workspace)
        self.num_sites = num_sites
        self.project_file = project_file
        self.sites_json = sites_json
        self.cases_per_site = cases_per_site
        self.size = size
        self.port = port
        self.byoc = byoc
        self.marker = uuid.uuid4().hex
        self.kits: Kits | None = None
        self.session: Any = None
        self.env = deployment_env(self.marker, home=os.path.join(self.workspace, "home"))

    # ---- steps a mode defines ----
    @abc.abstractmethod
    def prepare(self, project: dict[str, Any]) -> Kits:
        """Create the kits for ``project`` (already localized) and return them."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start the server and the clients (returns once they are up)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Ask everything to stop in order (the caller then checks and kills what remains)."""

    def service_paths(self) -> list[str]:
        """Folders whose appearance in a command line marks a process of this run."""
        return [self.workspace]

    # ---- the run ----
    def _setup(self) -> None:
        leftovers = find_processes(None, self.service_paths())
        if leftovers:
            logger.warning("an earlier run in %s left %d process(es); stopping them", self.workspace, len(leftovers))
            for proc in leftovers:
                logger.warning("  %s", describe(proc))
            kill_processes(leftovers)
        make_private_dir(self.workspace)  # it will hold the federation's root CA and keys
        if not self.port:
            self.port = find_free_port()
        elif not port_is_free(self.port):
            raise DeploymentError(
                f"port {self.port} is in use (pids {listening_pids(self.port)}); choose another --port"
            )

    def _localized_project(self) -> dict[str, Any]:
        project = local_project(load_project(self.project_file), self.num_sites, self.port)
        return project

    def _site_configs(self, kits: Kits) -> None:
        sites_json = self.sites_json or make_demo_federation(
            os.path.join(self.workspace, "data"), kits.clients, self.cases_per_site, self.size
        )
        write_site_configs(sites_json, kits.client_dirs)
        if not self.byoc:
            for participant in kits.services:
                path = allow_fedbrats_classes(kits.dir(participant))
                logger.info("%s: allowed %s in %s", participant, ", ".join(FEDBRATS_CLASS_ALLOW_LIST), path)

    def run(self, job_dir: str, out_dir: str, *, num_rounds: int | None = None, timeout: float = 3600.0) -> RunReport:
        """Prepare, start, run ``job_dir``, download its result into ``out_dir``, stop and check.

        Whatever happens (an error, Ctrl-C, SIGTERM after :func:`raise_on_termination`), everything started is
        stopped, and processes still running afterwards are killed and reported.
        """
        report = RunReport(self.mode, self.workspace)
        timings = report.timings
        started = False
        job_id: list[str] = []
        try:
            self._setup()
            report.port = self.port
            t = time.monotonic()
            project = self._localized_project()
            self.kits = self.prepare(project)
            report.sites = list(self.kits.clients)
            self._site_configs(self.kits)
            staged = stage_job(job_dir, os.path.join(self.workspace, "jobs"), num_rounds=num_rounds, byoc=self.byoc)
            timings["prepare_s"] = round(time.monotonic() - t, 2)
            logger.info("prepared %s federation in %.1fs: %s", self.mode, timings["prepare_s"], self.kits.prod_dir)

            t = time.monotonic()
            started = True
            self.start()
            self.session = open_admin_session(self.kits)
            wait_for_clients(self.session, self.kits)
            timings["start_s"] = round(time.monotonic() - t, 2)
            logger.info(
                "server localhost:%d and clients %s up in %.1fs",
                self.port,
                ", ".join(self.kits.clients),
                timings["start_s"],
            )

            outcome = submit_and_follow(
                self.session,
                staged,
                server_dir=self.kits.dir(self.kits.server),
                timeout=timeout,
                on_submit=job_id.append,
            )
            report.job_id, report.status = outcome.job_id, outcome.status
            timings["job_s"] = outcome.seconds
            timings["rounds"] = outcome.rounds
            t = time.monotonic()
            report.result_dir, report.global_model = download_result(self.session, outcome.job_id, out_dir)
            timings["download_s"] = round(time.monotonic() - t, 2)
            if not outcome.ok:
                report.error = f"job {outcome.job_id} ended with {outcome.status}; see {report.result_dir}"
        except KeyboardInterrupt as e:
            report.error = f"interrupted ({e or 'Ctrl-C'})"
            logger.warning("interrupted: stopping everything")
            self._abort(job_id)
        except Exception as e:
            report.error = str(e)
            logger.error("%s", e)
            self._abort(job_id)
        finally:
            self._shutdown(report, started)
            self._write_report(report, out_dir)
        return report

    def _abort(self, job_id: list[str]) -> None:
        if self.session is not None and job_id:
            try:
                self.session.abort_job(job_id[0])
            except Exception as e:  # the job may have ended already; stopping follows anyway
                logger.debug("abort of job %s: %s", job_id[0], e)

    def _shutdown(self, report: RunReport, started: bool) -> None:
        with _signals_deferred():
            self._shutdown_now(report, started)

    def _shutdown_now(self, report: RunReport, started: bool) -> None:
        t = time.monotonic()
        if started:
            try:
                self.stop()
            except BaseException as e:  # keep going: what remains is killed below
                logger.error("orderly stop failed (%s); asking each participant to stop", e)
                self._touch_shutdown()
        if self.session is not None:
            try:
                self.session.close()
            except Exception:
                pass
            self.session = None
        report.timings["stop_s"] = round(time.monotonic() - t, 2)
        cleanup = ensure_stopped(self.marker, self.service_paths(), self.port or None)
        report.timings["gone_s"] = round(time.monotonic() - t, 2)
        report.leftovers, report.port_free = cleanup.leftovers, cleanup.port_free
        if cleanup.clean:
            logger.info(
                "stopped in %.1fs; all processes gone and port %d free after %.1fs",
                report.timings["stop_s"],
                self.port,
                report.timings["gone_s"],
            )
        else:
            logger.error("not clean after the stop: killed %s; port free: %s", cleanup.leftovers, cleanup.port_free)

    def _touch_shutdown(self) -> None:
        if self.kits:
            for participant in self.kits.services:
                request_kit_stop(self.kits.dir(participant))

    @staticmethod
    def _write_report(report: RunReport, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "run_report.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(asdict(report), f, indent=2)
            f.write("\n")
        steps = [
            f"{label} {report.timings[key]}s"
            for key, label in (
                ("prepare_s", "prepare"),
                ("start_s", "start"),
                ("job_s", "job"),
                ("download_s", "download"),
                ("stop_s", "stop"),
                ("gone_s", "all gone after"),
            )
            if key in report.timings
        ]
        rounds = ", ".join(f"{r['round']}: {r['seconds']}s" for r in report.timings.get("rounds", []))
        if rounds:
            steps.append(f"rounds {rounds}")
        outcome = "OK" if report.ok else f"FAILED ({report.error or report.status or 'see the log'})"
        logger.info("%s run %s: %s; report %s", report.mode, outcome, ", ".join(steps), path)


class ProvisionedDeployment(Deployment):
    """Production startup kits from ``nvflare provision``, started with their own ``start.sh`` on loopback."""

    mode = "provisioned"

    def prepare(self, project: dict[str, Any]) -> Kits:
        prov = os.path.join(self.workspace, "provision")
        shutil.rmtree(prov, ignore_errors=True)
        project_file = write_project(project, os.path.join(self.workspace, "project.yml"))
        return provision(project_file, prov, self.env)

    def start(self) -> None:
        assert self.kits is not None
        server_dir = self.kits.dir(self.kits.server)
        start_kit(server_dir, self.env)
        waited = wait_for_listener(self.port, "127.0.0.1", 60, "the FL server", os.path.join(server_dir, "log.txt"))
        logger.info("server listening on localhost:%d after %.1fs", self.port, waited)
        for client in self.kits.clients:
            start_kit(self.kits.dir(client), self.env)

    def stop(self) -> None:
        from nvflare.fuel.flare_api.api_spec import TargetType

        if self.session is None:
            self.session = open_admin_session(self.kits, timeout=10)
        # No waiting here: ensure_stopped() then watches the processes and the port themselves.
        self.session.shutdown(TargetType.ALL, wait=False)


# ---- command line -----------------------------------------------------------------------------------------------
def default_job_dir() -> str:
    """``jobs/fedkd`` if it exists, else ``jobs/fedavg`` (of this checkout, else of the current folder)."""
    for root in (REPO_ROOT, Path.cwd()):
        for name in ("fedkd", "fedavg"):
            if (root / "jobs" / name / "meta.json").is_file():
                return str(root / "jobs" / name)
    raise DeploymentError("no jobs/fedkd or jobs/fedavg found; pass --job")


def add_run_arguments(parser: argparse.ArgumentParser, default_workspace: str) -> None:
    """Options shared by the PoC and the provisioned rehearsal."""
    parser.add_argument("-w", "--workspace", default=default_workspace, help="run folder (default %(default)s)")
    parser.add_argument("-n", "--sites", type=int, default=4, help="number of sites site-1..site-N (default 4)")
    parser.add_argument("--job", default=None, help="job folder (default jobs/fedkd if present, else jobs/fedavg)")
    parser.add_argument("--num-rounds", type=int, default=None, help="override the job's number of rounds")
    parser.add_argument("-o", "--output", default=None, help="where the result goes (default <workspace>/result)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--project", default=None, help="project file (default poc_setup/project.yml)")
    parser.add_argument("--sites-json", default=None, help="existing federation (fedbrats prepare); default synthetic")
    parser.add_argument("--cases-per-site", type=int, default=10, help="synthetic cases per site (default 10)")
    parser.add_argument("--size", type=int, default=32, help="synthetic volume size (default 32)")
    parser.add_argument(
        "--no-byoc",
        action="store_true",
        help="submit the job without app/custom and put fedbrats. on each site's class_allow_list instead",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the job is aborted")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log the nvflare commands' output")


def run_from_args(cls: type[Deployment], args: argparse.Namespace) -> int:
    """Build a deployment from parsed options, run it, and return the exit status (0 when all went well)."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("nvflare").setLevel(logging.WARNING)
    raise_on_termination()
    try:
        job = args.job or default_job_dir()
        nvflare_cli()
    except DeploymentError as e:
        logger.error("%s", e)
        return 2
    deployment = cls(
        args.workspace,
        args.sites,
        project_file=args.project,
        sites_json=args.sites_json,
        cases_per_site=args.cases_per_site,
        size=args.size,
        port=args.port,
        byoc=not args.no_byoc,
    )
    output = args.output or os.path.join(deployment.workspace, "result")
    report = deployment.run(job, output, num_rounds=args.num_rounds, timeout=args.timeout)
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedbrats.deploy.provision``: rehearse the production deployment on loopback."""
    parser = argparse.ArgumentParser(
        prog="python -m fedbrats.deploy.provision",
        description="Provision from poc_setup/project.yml (server on localhost, a free port, N sites), start the "
        "server and the clients from their startup kits (mutual TLS), run a job, download the global model, shut "
        "down and check that nothing is left running.",
    )
    add_run_arguments(parser, default_workspace("fedbrats_provisioned"))
    return run_from_args(ProvisionedDeployment, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
