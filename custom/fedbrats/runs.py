"""What a run leaves on disk, in one place: the server's run folder (:class:`RunFolder`), an exported model folder
(:class:`ModelFolder`, a MONAI bundle), the files of a site's run folder, and loading their checkpoints and
network specs safely (``torch.load(weights_only=True)`` only).

Every other module takes these file names and readers from here, so that a file name is written once.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedbrats.federated.protocol import MODEL_SPEC_KEY

# ---- the server's run folder -------------------------------------------------------------------------------
#: Per-round records (metrics, sites, left-out and rejected sites, seconds), rewritten after every round.
METRICS_FILE = "metrics.json"
#: The network spec of the saved models (they hold weights only).
MODEL_SPEC_FILE = "model_spec.json"
#: The aggregation strategy's state (e.g. FedKD's prototypes), for resuming and for the benchmarks.
SERVER_STATE_FILE = "server_state.npz"
#: The post-processing chosen on validation (also the key of an exported model's metadata).
POSTPROCESSING_FILE = "postprocessing.json"
#: The controller's progress as JSON lines (see :mod:`fedbrats.federated.events`).
ROUND_EVENTS_FILE = "round_events.jsonl"
#: NVFlare's server app folder and its persistor's checkpoint names (PTFileModelPersistor's defaults).
SERVER_APP_DIR = "app_server"
GLOBAL_MODEL_FILE = "FL_global_model.pt"
BEST_GLOBAL_MODEL_FILE = "best_FL_global_model.pt"
#: Server checkpoints of a federated run, best first.
RUN_CHECKPOINTS: tuple[str, ...] = (BEST_GLOBAL_MODEL_FILE, GLOBAL_MODEL_FILE)
#: The sites' own models of a local-only run (``<site>.pt``).
SITE_MODELS_DIR = "site_models"
#: Where NVFlare's TensorBoard receiver streams the sites' scalars (its default folder).
TB_EVENTS_DIR = "tb_events"
#: NVFlare's cross-site evaluation folder (``AppConstants.CROSS_VAL_DIR``) and its results file,
#: ``{data_site: {model_name: metrics}}`` (the metrics of :func:`fedbrats.federated.protocol.cross_site_metric_key`).
CROSS_SITE_DIR = "cross_site_val"
CROSS_SITE_RESULTS_FILE = "cross_val_results.json"
#: The cross-site evaluations that failed, ``{data_site: {model_name: reason}}``, next to the results.
CROSS_SITE_ERRORS_FILE = "cross_site_errors.json"
#: The report of the cross-site evaluation (:mod:`fedbrats.federated.server.cross_site_report`), beside the results.
CROSS_SITE_SUMMARY_FILE = "cross_site_summary.json"
CROSS_SITE_MATRIX_FILE = "cross_site_matrix.md"
CROSS_SITE_HEATMAP_FILE = "cross_site_heatmap.png"

#: A site's run folder: one line per result it sent (see :class:`fedbrats.federated.filters.PayloadAuditFilter`).
PAYLOAD_AUDIT_FILE = "payload_audit.jsonl"
#: A site's run folder: its own progress as JSON lines, one ``site_work`` event per training round (see
#: :mod:`fedbrats.federated.events`), written by the training script.
SITE_EVENTS_FILE = "site_events.jsonl"
#: A site's run folder: one line per task that arrived, before anything decodes it (jobs with compression).
PAYLOAD_AUDIT_IN_FILE = "payload_audit_in.jsonl"

#: Files of an exported model folder (see :mod:`fedbrats.evaluation.export` and :class:`ModelFolder`).
EXPORTED_MODEL_FILE = "model.pt"
EXPORTED_METADATA_FILE = "metadata.json"
#: The key of the exported metadata that holds the post-processing choice (its network spec is under
#: :data:`MODEL_SPEC_KEY`).
EXPORTED_POSTPROCESSING_KEY = "postprocessing"
#: The key of the exported metadata that holds the training preprocessing (zoom, crop size, normalisation).
EXPORTED_PREPROCESSING_KEY = "preprocessing"
#: An exported model is a MONAI bundle: its sub-folders and the files beyond model.pt and metadata.json.
BUNDLE_CONFIGS_DIR = "configs"
BUNDLE_MODELS_DIR = "models"
BUNDLE_DOCS_DIR = "docs"
BUNDLE_INFERENCE_FILE = "inference.json"
BUNDLE_TORCHSCRIPT_FILE = "model.ts"


@dataclass(frozen=True)
class RunFolder:
    """The server's run folder of a federated job (NVFlare's run dir, or a copy of it): where each file lies.

    Args:
        path: the folder (need not exist yet).

    Raises:
        ValueError: ``path`` is empty.
    """

    path: str

    #: What a resumed run needs from a previous one (relative paths; server_state.npz may be absent).
    RESUME_FILES: ClassVar[tuple[str, ...]] = (
        METRICS_FILE,
        MODEL_SPEC_FILE,
        SERVER_STATE_FILE,
        os.path.join(SERVER_APP_DIR, GLOBAL_MODEL_FILE),
    )

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError(f"path must name the run folder, got {self.path!r}")
        object.__setattr__(self, "path", os.fspath(self.path))

    def _file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    @property
    def metrics(self) -> str:
        """``metrics.json``: the per-round records."""
        return self._file(METRICS_FILE)

    @property
    def model_spec(self) -> str:
        """``model_spec.json``: the network of the saved models."""
        return self._file(MODEL_SPEC_FILE)

    @property
    def server_state(self) -> str:
        """``server_state.npz``: the aggregation strategy's state."""
        return self._file(SERVER_STATE_FILE)

    @property
    def postprocessing(self) -> str:
        """``postprocessing.json``: the post-processing chosen on validation."""
        return self._file(POSTPROCESSING_FILE)

    @property
    def round_events(self) -> str:
        """``round_events.jsonl``: the controller's progress events."""
        return self._file(ROUND_EVENTS_FILE)

    @property
    def app_server(self) -> str:
        """``app_server/``: NVFlare's server app folder with the checkpoints."""
        return self._file(SERVER_APP_DIR)

    @property
    def global_model(self) -> str:
        """``app_server/FL_global_model.pt``: the last global model."""
        return self._file(SERVER_APP_DIR, GLOBAL_MODEL_FILE)

    @property
    def best_global_model(self) -> str:
        """``app_server/best_FL_global_model.pt``: the global model with the best validation score."""
        return self._file(SERVER_APP_DIR, BEST_GLOBAL_MODEL_FILE)

    @property
    def checkpoints(self) -> tuple[str, ...]:
        """The server's checkpoints in ``app_server/``, best first (see :data:`RUN_CHECKPOINTS`)."""
        return tuple(self._file(SERVER_APP_DIR, name) for name in RUN_CHECKPOINTS)

    @property
    def site_models(self) -> str:
        """``site_models/``: the sites' own models of a local-only run."""
        return self._file(SITE_MODELS_DIR)

    def site_model(self, site: str) -> str:
        """``site_models/<site>.pt``.

        Raises:
            ValueError: ``site`` is empty or holds a path separator.
        """
        if not site or os.sep in site or (os.altsep and os.altsep in site):
            raise ValueError(f"site must be a plain site name, got {site!r}")
        return os.path.join(self.site_models, f"{site}.pt")

    @property
    def tb_events(self) -> str:
        """``tb_events/``: the sites' TensorBoard scalars."""
        return self._file(TB_EVENTS_DIR)

    @property
    def cross_site_dir(self) -> str:
        """``cross_site_val/``: NVFlare's cross-site evaluation folder (results, errors, the report)."""
        return self._file(CROSS_SITE_DIR)

    @property
    def cross_site_results(self) -> str:
        """``cross_site_val/cross_val_results.json``: every site's metrics of every model."""
        return self._file(CROSS_SITE_DIR, CROSS_SITE_RESULTS_FILE)

    @property
    def cross_site_errors(self) -> str:
        """``cross_site_val/cross_site_errors.json``: why a site's evaluation of a model failed."""
        return self._file(CROSS_SITE_DIR, CROSS_SITE_ERRORS_FILE)

    @property
    def cross_site_summary(self) -> str:
        """``cross_site_val/cross_site_summary.json``: the report's numbers."""
        return self._file(CROSS_SITE_DIR, CROSS_SITE_SUMMARY_FILE)

    @property
    def cross_site_matrix(self) -> str:
        """``cross_site_val/cross_site_matrix.md``: the report's tables."""
        return self._file(CROSS_SITE_DIR, CROSS_SITE_MATRIX_FILE)

    @property
    def cross_site_heatmap(self) -> str:
        """``cross_site_val/cross_site_heatmap.png``: the model x site matrix of mean Dice."""
        return self._file(CROSS_SITE_DIR, CROSS_SITE_HEATMAP_FILE)

    @property
    def client_config(self) -> str:
        """``app_server/config/config_fed_client.json``: the job's site configuration (NVFlare deploys the job's one
        app, sites' part included, to the server too), where the training options of the run are recorded."""
        return self._file(SERVER_APP_DIR, "config", "config_fed_client.json")


@dataclass(frozen=True)
class ModelFolder:
    """An exported model folder, a MONAI bundle (``configs/``, ``models/``, ``docs/``): where each file lies.

    Exports made before the bundle layout hold ``model.pt`` and ``metadata.json`` at the top; :meth:`of` and the
    readers of a model folder accept them too.

    Args:
        path: the bundle's root folder (need not exist yet).

    Raises:
        ValueError: ``path`` is empty.
    """

    path: str

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError(f"path must name the model folder, got {self.path!r}")
        object.__setattr__(self, "path", os.fspath(self.path))

    @property
    def model(self) -> str:
        """``models/model.pt``: the weights, a bare state dict."""
        return os.path.join(self.path, BUNDLE_MODELS_DIR, EXPORTED_MODEL_FILE)

    @property
    def torchscript(self) -> str:
        """``models/model.ts``: the traced network, where tracing reproduces it."""
        return os.path.join(self.path, BUNDLE_MODELS_DIR, BUNDLE_TORCHSCRIPT_FILE)

    @property
    def metadata(self) -> str:
        """``configs/metadata.json``: MONAI's bundle metadata plus the package's description of the model."""
        return os.path.join(self.path, BUNDLE_CONFIGS_DIR, EXPORTED_METADATA_FILE)

    @property
    def inference_config(self) -> str:
        """``configs/inference.json``: the inference workflow for ``python -m monai.bundle run``."""
        return os.path.join(self.path, BUNDLE_CONFIGS_DIR, BUNDLE_INFERENCE_FILE)

    @property
    def readme(self) -> str:
        """``docs/README.md``: how to use the bundle."""
        return os.path.join(self.path, BUNDLE_DOCS_DIR, "README.md")

    @property
    def flat_files(self) -> tuple[str, str]:
        """``model.pt`` and ``metadata.json`` at the top: the layout of exports made before the bundle."""
        return os.path.join(self.path, EXPORTED_MODEL_FILE), os.path.join(self.path, EXPORTED_METADATA_FILE)

    @staticmethod
    def metadata_of(weights: str) -> str | None:
        """The ``metadata.json`` that describes an exported weights file, or ``None`` for any other file.

        ``<root>/models/model.pt`` is described by ``<root>/configs/metadata.json`` (a bundle),
        ``<root>/model.pt`` by ``<root>/metadata.json`` (an earlier export).
        """
        if os.path.basename(weights) != EXPORTED_MODEL_FILE:
            return None
        folder = os.path.dirname(os.path.abspath(weights))
        candidates = [os.path.join(folder, EXPORTED_METADATA_FILE)]
        if os.path.basename(folder) == BUNDLE_MODELS_DIR:
            candidates.insert(0, ModelFolder(os.path.dirname(folder)).metadata)
        return next((c for c in candidates if os.path.isfile(c)), None)


# ---- reading checkpoints and specs --------------------------------------------------------------------------
def find_in_one_run(path: str, *parts: str, what: str) -> str | None:
    """The file ``<run>/<parts...>`` of the one run folder nested one to three levels below ``path`` (a simulator
    workspace holds its run in ``<workspace>/server/simulate_job``), or None when there is none.

    Raises:
        ValueError: several runs below ``path`` hold such a file (named); ``what`` says what else to pass.
    """
    found = sorted({p for depth in range(1, 4) for p in glob.glob(os.path.join(path, *["*"] * depth, *parts))})
    if len(found) > 1:
        raise ValueError(f"folder {path!r} holds several runs {found}; pass one run folder or {what}")
    return found[0] if found else None


def resolve_checkpoint(path: str) -> str:
    """The weights file behind a checkpoint path, an exported model folder or a federated run folder.

    A folder resolves to ``models/model.pt`` (exported bundle; ``model.pt`` of an earlier export), else
    ``app_server/best_FL_global_model.pt`` falling back to ``app_server/FL_global_model.pt`` (run folder), else the
    same files directly inside it; a simulator workspace holding exactly one run (``.../app_server/...`` up to three
    levels down) works too.

    Raises:
        ValueError: the path does not exist, or a folder holds no (or more than one) candidate checkpoint.
    """
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ValueError(f"model {path!r} does not exist (expected a checkpoint, a run folder or an exported model)")
    candidates = [ModelFolder(path).model, ModelFolder(path).flat_files[0]]
    candidates += list(RunFolder(path).checkpoints)
    candidates += [os.path.join(path, name) for name in RUN_CHECKPOINTS]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    # A simulator workspace nests the run folder (e.g. <workspace>/server/simulate_job/app_server).
    for name in RUN_CHECKPOINTS:
        found = find_in_one_run(path, SERVER_APP_DIR, name, what="checkpoint")
        if found:
            return found
    raise ValueError(
        f"folder {path!r} holds no model: expected models/{EXPORTED_MODEL_FILE} (exported model) or "
        f"{SERVER_APP_DIR}/{RUN_CHECKPOINTS[0]} / {SERVER_APP_DIR}/{RUN_CHECKPOINTS[1]} (federated run)"
    )


def read_json(path: str, what: str) -> Any:
    """Parsed JSON file; ``what`` names the file's role in the error message.

    Raises:
        ValueError: the file cannot be read or is not valid JSON.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise ValueError(f"{what} {path!r} cannot be read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path!r} is not valid JSON: {exc}") from exc


def spec_from_json(path: str) -> dict[str, Any]:
    """The network spec in ``model_spec.json`` or in an exported model's ``metadata.json``.

    Raises:
        ValueError: the file is unreadable or holds no spec.
    """
    content = read_json(path, "model spec")
    # An exported model's metadata.json holds the spec under "model_spec"; model_spec.json is the spec itself.
    spec = content.get(MODEL_SPEC_KEY, content) if isinstance(content, dict) else None
    if not isinstance(spec, dict) or "path" not in spec:
        raise ValueError(f"{path!r} holds no model spec (a JSON object with 'path' and 'args')")
    return spec


def find_model_spec(checkpoint: str) -> str:
    """Path of the ``model_spec.json`` (or exported ``metadata.json``) that describes ``checkpoint``.

    An exported ``model.pt`` is described by its bundle's ``configs/metadata.json``; otherwise the spec is looked
    for in the checkpoint's folder and up to two parent folders: a run folder has the spec at its top and the
    checkpoints in ``app_server/`` (or local models in ``site_models/``).

    Raises:
        ValueError: no spec file was found.
    """
    exported = ModelFolder.metadata_of(checkpoint)
    if exported is not None:
        return exported
    folder = os.path.dirname(os.path.abspath(checkpoint))
    searched = []
    for _ in range(3):
        searched.append(folder)
        spec_path = RunFolder(folder).model_spec
        if os.path.isfile(spec_path):
            return spec_path
        meta_path = os.path.join(folder, EXPORTED_METADATA_FILE)
        if os.path.isfile(meta_path):
            return meta_path
        folder = os.path.dirname(folder)
    raise ValueError(
        f"no {MODEL_SPEC_FILE} or {EXPORTED_METADATA_FILE} found for checkpoint {checkpoint!r} (searched {searched}); "
        "pass the network description with --spec / spec="
    )


def _load_failure(exc: BaseException) -> str:
    """The reason of a failed ``torch.load(weights_only=True)``, without torch's advice to retry unsafely.

    torch's message suggests re-running with ``weights_only=False``, which executes whatever the file holds:
    advice that must never reach a user holding a file of unknown origin, so only the unpickler's reason is kept.
    """
    text = str(exc).replace("\x1b[1m", "").replace("\x1b[0m", "")
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line for line in lines if "weights_only" not in line), type(exc).__name__)
    return reason.split(" Please use", 1)[0].rstrip(".")


def load_weights_file(path: str, what: str = "checkpoint") -> Any:
    """What a weights file holds, opened with ``torch.load(weights_only=True)`` only, so that it cannot run code.

    Args:
        path: the file.
        what: what the file is, for the messages (``"checkpoint"``, ``"FedMIC personal model"``).

    Raises:
        ValueError: the file is missing, or cannot be loaded as plain weights (the file is named; torch's advice
            to load it unsafely is left out).
    """
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError...) for bad files
        raise ValueError(
            f"{what} {path!r} is not a plain weights file and was refused ({_load_failure(exc)}); "
            "opening it otherwise could run code stored in it. Use a file saved by fedbrats or NVFlare from a source "
            "you trust"
        ) from None


def load_state_dict(checkpoint: str) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint saved as ``{"model": state_dict}`` or as a bare state dict.

    Only ``torch.load(weights_only=True)`` is used, so a checkpoint cannot run code when it is opened.

    Raises:
        ValueError: the file is missing, cannot be loaded or holds no state dict.
    """
    content = load_weights_file(checkpoint)
    state = content.get("model", content) if isinstance(content, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(k, str) for k in state):
        raise ValueError(f"checkpoint {checkpoint!r} holds no state dict (expected {{'model': state_dict}} or one)")
    try:
        return {k: torch.as_tensor(v) for k, v in state.items()}
    except (TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"checkpoint {checkpoint!r}: not every entry is a tensor ({exc})") from exc


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_exported_model(path: str) -> bool:
    """Check an exported ``model.pt`` against the ``model_sha256`` its ``metadata.json`` recorded.

    A replaced, truncated or zeroed ``model.pt`` would otherwise load (or fail late) and predict nonsense with
    exit 0. Files outside an exported folder (checkpoints of a run) have no recorded checksum and are not checked.

    Returns:
        True when a checksum was recorded and matches, False when there is none to check.

    Raises:
        ValueError: the recorded checksum does not match (the file and the way out are named).
    """
    meta_path = ModelFolder.metadata_of(path)
    metadata = read_model_metadata(path)
    expected = metadata.get("model_sha256")
    recorded_file = os.path.basename(str(metadata.get("model_file", EXPORTED_MODEL_FILE)))
    if not expected or os.path.basename(path) != recorded_file:
        return False
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(
            f"model file {path!r} does not match the model_sha256 recorded in {meta_path} (sha256 {actual[:12]}... "
            f"instead of {str(expected)[:12]}...): it was replaced or damaged after export. Export the model "
            "again, or pass --skip-integrity-check only if you know where this file comes from"
        )
    return True


def read_model_metadata(model: str) -> dict[str, Any]:
    """The ``metadata.json`` of an exported model (given as its folder or its ``model.pt``), else ``{}``."""
    if os.path.isdir(model):
        folder = ModelFolder(model)
        candidates = [folder.metadata, folder.flat_files[1]]
        path = next((c for c in candidates if os.path.isfile(c)), None)
    else:
        path = ModelFolder.metadata_of(model)
    if path is None:
        return {}
    content = read_json(path, "model metadata")
    return content if isinstance(content, dict) else {}
