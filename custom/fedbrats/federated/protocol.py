"""The round protocol in one place: the keys of the messages between server and sites, what a site may send
(checked on both ends), and the layout of the server's run folder (and the files of a site's).

Every other module takes these names from here, so that a key or a file name is written once.

Nothing derived from a single patient's voxels leaves a site beyond these items: model weights, aggregate
validation metrics, counts, the site's sequence availability and, for methods that declare them, region
prototypes averaged over many voxels and cases.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

# ---- server -> site (the meta of a task) -------------------------------------------------------------------
#: The network's ``{"path", "args"}`` spec: the architecture is defined once, on the server.
MODEL_SPEC_KEY = "model_spec"
#: Whether a site keeps its own weights instead of loading the global model (local-only training).
KEEP_LOCAL_WEIGHTS_KEY = "keep_local_weights"
#: FedKD's global region prototypes and which of them hold a value.
GLOBAL_PROTOTYPES_KEY = "global_prototypes"
GLOBAL_PROTOTYPE_VALID_KEY = "global_prototype_valid"
#: IsoFed's cross hand-off: weights (name -> array) a site starts its local training from instead of the global
#: model it scores (sent to labelled sites only: the unlabelled group's model).
HANDOFF_PARAMS_KEY = "handoff_params"

# ---- site -> server (the meta of a result) -----------------------------------------------------------------
SITE_NAME_KEY = "site_name"
#: The site's available sequences (names).
MODALITIES_KEY = "modalities"
#: Optimisation steps this round (the aggregation weight).
NUM_STEPS_KEY = "num_steps"
NUM_TRAIN_CASES_KEY = "num_train_cases"
#: Mean training loss of the round, and the mean of each loss term.
TRAIN_LOSS_KEY = "train_loss"
LOSS_TERMS_KEY = "loss_terms"
#: Learning rate at the end of the round (the schedule is the job's, not the data's).
LR_KEY = "lr"
#: NVFlare's own key for the number of steps.
NVFLARE_NUM_STEPS_KEY = "NUM_STEPS_CURRENT_ROUND"
#: Meta key of a site that cannot do its task: the one-line reason (its error message, cut to
#: :data:`SITE_ERROR_MAX_CHARS`), so that the server can name why a job stops. Sent instead of weights.
SITE_ERROR_KEY = "site_error"
SITE_ERROR_MAX_CHARS = 500
#: Meta key of an SVD-compressed payload, both ways (see :mod:`fedbrats.federated.compression`): the energy kept
#: and, from the server, which weights a site must hold to rebuild the global model. The receiving filter removes it.
SVD_META_KEY = "svd_compression"
#: Whether the site trained with labels (a flag of the site's configuration, like its sequences), for methods
#: whose server keeps labelled and unlabelled sites apart (IsoFed).
LABELLED_KEY = "labelled"

#: Meta keys every method may send.
BASE_META_KEYS: frozenset[str] = frozenset(
    {
        SITE_NAME_KEY,
        SITE_ERROR_KEY,
        MODALITIES_KEY,
        NUM_STEPS_KEY,
        NUM_TRAIN_CASES_KEY,
        TRAIN_LOSS_KEY,
        LOSS_TERMS_KEY,
        LR_KEY,
        NVFLARE_NUM_STEPS_KEY,
        # Added by NVFlare's privacy filters on the way out: which filters ran and the privacy spent.
        "filter_history",
        "svt_privacy_budget",
        "svt_privacy_accountant",
        # Added by the SVD compression filter on the way out (and removed by its pair on the server).
        SVD_META_KEY,
    }
)

#: Metric keys (aggregate over the site's validation cases) start with this.
METRIC_PREFIX = "val_"
#: The metric that selects the best global model (mean Dice over WT, TC and ET).
KEY_METRIC = f"{METRIC_PREFIX}mean_dice"


def global_task_meta(spec: Mapping[str, Any], keep_local_weights: bool, extras: Mapping[str, Any]) -> dict[str, Any]:
    """The meta the server sends with every task: the network spec, the keep-local flag and the strategy's extras.

    Args:
        spec: the network's ``{"path", "args"}`` spec.
        keep_local_weights: the aggregation strategy's flag (local-only training).
        extras: the strategy's global state for the sites (e.g. FedKD's prototypes).
    """
    return {MODEL_SPEC_KEY: spec, KEEP_LOCAL_WEIGHTS_KEY: keep_local_weights, **extras}


def site_update_meta(
    site_name: str, modalities: Any, num_train_cases: int, summary: Mapping[str, Any], extras: Mapping[str, Any]
) -> dict[str, Any]:
    """The meta of a site's training result (the items of :data:`BASE_META_KEYS` it fills, then the method's).

    Args:
        site_name: the site.
        modalities: the site's available sequences.
        num_train_cases: its training cases (the weight of its metrics on the server).
        summary: the round's summary from the trainer (steps, loss, loss terms, learning rate).
        extras: the method's declared payload, already converted by :func:`to_wire`.
    """
    return {
        SITE_NAME_KEY: site_name,
        MODALITIES_KEY: list(modalities),
        NUM_TRAIN_CASES_KEY: num_train_cases,
        **summary,
        **extras,
    }


def site_error_meta(site_name: str, exc: BaseException) -> dict[str, Any]:
    """The meta of a site that cannot do its task: its name and the failure's one-line reason."""
    return {SITE_NAME_KEY: site_name, SITE_ERROR_KEY: f"{type(exc).__name__}: {exc}"[:SITE_ERROR_MAX_CHARS]}


def update_weight(meta: Mapping[str, Any]) -> float:
    """A site update's aggregation weight: its optimisation steps (1 when it did not say)."""
    return float(meta.get(NUM_STEPS_KEY, 1) or 1)


def to_wire(value: Any) -> Any:
    """Convert tensors to numpy so they survive NVFlare's serialiser (torch tensors in meta break a job)."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    return value


def undeclared_meta_keys(meta: dict[str, Any], declared: frozenset[str] | set[str]) -> list[str]:
    """Meta keys a site sent that are neither base keys nor declared by its method."""
    allowed = BASE_META_KEYS | set(declared)
    return sorted(k for k in meta if k not in allowed)


def is_finite_array(value: Any) -> bool:
    """True when every number in ``value`` (array, list, scalar) is finite."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return bool(np.isfinite(arr).all())


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
