"""An exported model as a MONAI bundle: what MONAI's tools need beyond the weights.

:func:`fedbrats.evaluation.export.export_model` writes the bundle; this module holds its parts:

- :func:`monai_metadata`: the fields MONAI's bundle metadata schema (:data:`SCHEMA_URL`) asks for, with
  ``network_data_format`` describing the two inputs of every network of the package (the 4-channel image and the
  sequence-availability mask) and its output;
- :func:`inference_config`: ``configs/inference.json``, a MONAI workflow for ``python -m monai.bundle run`` built
  from the same steps as ``predict`` (:func:`fedbrats.data.loader.inference_steps`,
  :func:`fedbrats.evaluation.predict.postprocessing_steps`), so the bundle preprocesses exactly as training did;
- :func:`export_torchscript`: ``models/model.ts`` where tracing reproduces the network.

A bundle config names classes that ``monai.bundle`` imports and builds; the package's own classes a config may
name are the registered :data:`BUNDLE_COMPONENTS` and networks (:data:`fedbrats.networks.NETWORKS`), and
:func:`check_config_targets` refuses anything else before a bundle is written.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

import fedbrats.federated.methods  # noqa: F401 - registers the methods' own networks and strategies
from fedbrats.constants import MODALITIES, REGIONS
from fedbrats.data.conventions import CONVENTIONS
from fedbrats.data.loader import SPATIAL_DIVISOR, inference_steps
from fedbrats.data.transforms import MASK_KEY, Ref
from fedbrats.evaluation.predict import PREPROCESSING_REF, inferer_step, postprocessing_steps
from fedbrats.federated.methods.fedkd.network import ModalityAwareSegNet
from fedbrats.networks import NETWORKS
from fedbrats.registry import Registry
from fedbrats.runs import BUNDLE_MODELS_DIR, EXPORTED_MODEL_FILE

logger = logging.getLogger(__name__)

#: MONAI's bundle metadata schema (the one the model zoo's bundles name); ``verify_metadata`` downloads it.
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"

#: The package's classes a bundle config may name (besides registered networks); MONAI's own are named by their
#: ``monai.`` path.
BUNDLE_COMPONENTS: Registry[Any] = Registry(
    "bundle component",
    object,
    {
        "LoadBraTSCased": "fedbrats.data.transforms.LoadBraTSCased",
        "MaskedSlidingWindowInferer": "fedbrats.scoring.inference.MaskedSlidingWindowInferer",
        "RemoveSmallComponentsd": "fedbrats.scoring.postprocess.RemoveSmallComponentsd",
        "RegionsToLabelsd": "fedbrats.evaluation.predict.RegionsToLabelsd",
    },
)

#: Leading characters that MONAI's config parser interprets (``$`` Python expression, ``@`` reference, ``%`` macro).
_CONFIG_SYNTAX = ("$", "@", "%")

_CHANNEL_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}


def network_data_format(roi_size: Sequence[int]) -> dict[str, Any]:
    """``network_data_format`` of the package's networks: ``forward(image, modality_mask)`` -> WT/TC/ET logits.

    Args:
        roi_size: the window the network is run on (its training crop).
    """
    window = [int(s) for s in roi_size]
    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "MR",
                "num_channels": len(MODALITIES),
                "spatial_shape": window,
                "dtype": "float32",
                "value_range": [],  # z-scores: unbounded
                "is_patch_data": True,
                "channel_def": {str(i): _CHANNEL_NAMES[m] for i, m in enumerate(MODALITIES)},
            },
            MASK_KEY: {
                "type": "tensor",
                "format": "sequence availability",
                "num_channels": len(MODALITIES),
                "spatial_shape": [],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": False,
                "channel_def": {
                    str(i): f"{_CHANNEL_NAMES[m]} present (1) or absent (0)" for i, m in enumerate(MODALITIES)
                },
            },
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "logits",
                "num_channels": len(REGIONS),
                "spatial_shape": window,
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": True,
                "channel_def": {str(i): region for i, region in enumerate(REGIONS)},
            }
        },
        "post_processed_outputs": {
            "pred": {
                "type": "image",
                "format": "labels",
                "num_channels": 1,
                "spatial_shape": ["H", "W", "D"],  # the input's grid
                "dtype": "uint8",
                "value_range": [0, max(c.et_label for c in CONVENTIONS.values())],
                "is_patch_data": False,
                "channel_def": {"0": "BraTS labels: 0 background, 1 NCR, 2 ED, 4 (brats2018) or 3 (brats2023) ET"},
            }
        },
    }


def monai_metadata(
    *,
    version: str,
    name: str,
    description: str,
    roi_size: Sequence[int],
    authors: str,
    copyright_: str,
    required_packages: Mapping[str, str],
    eval_metrics: Mapping[str, Any],
    references: Sequence[str],
) -> dict[str, Any]:
    """The fields of MONAI's bundle metadata schema (:data:`SCHEMA_URL`); the package adds its own beside them."""
    import monai

    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: "exported by fedbrats"},
        "monai_version": str(monai.__version__),
        "pytorch_version": str(torch.__version__).split("+")[0],
        "numpy_version": str(np.__version__),
        "required_packages_version": dict(required_packages),
        "name": name,
        "task": "Brain tumour segmentation (whole tumour, tumour core, enhancing tumour) from any non-empty subset "
        "of the MRI sequences T1, T1ce, T2 and FLAIR",
        "description": description,
        "authors": authors,
        "copyright": copyright_,
        "data_source": "BraTS-style cases of the sites of the federation that trained the model (see training_data)",
        "data_type": "nibabel",
        "image_classes": "4 channels in the order T1, T1ce, T2, FLAIR; an absent sequence is a zero channel and 0 in "
        "the modality_mask",
        "label_classes": "BraTS labels: 1 necrotic / non-enhancing core, 2 edema, 4 (2018-2021) or 3 (2023+) "
        "enhancing tumour",
        "pred_classes": "3 channels of logits: WT, TC, ET (sigmoid, threshold 0.5); post-processed into one BraTS "
        "label map on the input's grid",
        "eval_metrics": dict(eval_metrics),
        "intended_use": "Research only; not a medical device and not validated for clinical use",
        "references": list(references),
        "network_data_format": network_data_format(roi_size),
    }


def inference_config(
    spec: Mapping[str, Any],
    *,
    zoom: float,
    roi_size: Sequence[int],
    min_component_voxels: int,
    overlap: float = 0.5,
) -> dict[str, Any]:
    """``configs/inference.json``: segment a new patient with ``python -m monai.bundle run``.

    The patient's sequences are the config items ``t1``, ``t1ce``, ``t2``, ``flair`` (null: absent; any
    non-empty subset); ``convention`` chooses the ET label, ``output_dir`` where ``<first sequence>_seg.nii.gz``
    goes. The preprocessing, inferer and post-processing are the steps ``predict`` builds.

    Args:
        spec: the network's ``{"path", "args"}`` (a registered network).
        zoom: the training resampling factor.
        roi_size: the sliding window (the training crop).
        min_component_voxels: the post-processing size chosen on validation.
        overlap: sliding-window overlap.
    """
    steps = postprocessing_steps(Ref("convention"), Ref("min_component_voxels"))
    postprocessing = [step.to_config() for step in steps]
    postprocessing.append(
        {
            "_target_": "monai.transforms.SaveImaged",
            "keys": "pred",
            "output_dir": "@output_dir",
            "output_postfix": "seg",
            "output_dtype": "uint8",
            "resample": False,
            "separate_folder": False,
            "print_log": True,
        }
    )
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": f"$@bundle_root + '/{BUNDLE_MODELS_DIR}/{EXPORTED_MODEL_FILE}'",
        "output_dir": "$@bundle_root + '/eval'",
        **{modality: None for modality in MODALITIES},
        "convention": "brats2018",
        "min_component_voxels": int(min_component_voxels),
        "datalist": [{"image": [f"@{modality}" for modality in MODALITIES]}],
        "network_def": {"_target_": spec["path"], **dict(spec.get("args") or {})},
        "network": "$@network_def.to(@device)",
        PREPROCESSING_REF: {
            "_target_": "monai.transforms.Compose",
            "transforms": [step.to_config() for step in inference_steps(zoom)],
        },
        "dataset": {"_target_": "monai.data.Dataset", "data": "@datalist", "transform": f"@{PREPROCESSING_REF}"},
        "dataloader": {
            "_target_": "monai.data.DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": inferer_step(roi_size, overlap).to_config(),
        "postprocessing": {"_target_": "monai.transforms.Compose", "transforms": postprocessing},
        "handlers": [
            {
                "_target_": "monai.handlers.CheckpointLoader",
                "load_path": "@ckpt_path",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {"_target_": "monai.handlers.StatsHandler", "iteration_log": False},
        ],
        # The networks take the sequence mask as a second input: the batch's mask goes to the inferer.
        "prepare_batch": {"_target_": "monai.engines.PrepareBatchExtraInput", "extra_keys": MASK_KEY},
        "evaluator": {
            "_target_": "monai.engines.SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "prepare_batch": "@prepare_batch",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "run": ["$@evaluator.run()"],
    }


def check_config_targets(config: Any, where: str = "bundle config") -> None:
    """Check that a bundle config names only MONAI's classes, registered networks and :data:`BUNDLE_COMPONENTS`,
    and that no network argument would be read as config syntax (``$`` code, ``@`` reference, ``%`` macro).

    Raises:
        ValueError: an unregistered class or a network argument starting with ``$``, ``@`` or ``%`` (named).
    """

    def visit(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            target = node.get("_target_")
            if isinstance(target, str) and not target.startswith("monai."):
                try:
                    NETWORKS.path(target)
                    is_network = True
                except ValueError:
                    BUNDLE_COMPONENTS.path(target)  # raises, naming the class, when it is not registered either
                    is_network = False
                if is_network:
                    for name, value in node.items():
                        if isinstance(value, str) and value.startswith(_CONFIG_SYNTAX):
                            raise ValueError(
                                f"{where}: argument {name!r} of network {target!r} is {value!r}, which MONAI would "
                                "interpret as config syntax"
                            )
            for key, value in node.items():
                visit(value, f"{path}#{key}" if path else str(key))
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                visit(value, f"{path}#{i}")

    visit(config, "")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


class _LogitsOnly(torch.nn.Module):
    """The network with its logits as the only output (some networks return a dict while training tools read
    extra outputs), so that the TorchScript is ``forward(image, modality_mask) -> logits`` for every network."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
        out = self.network(image, modality_mask)
        return out["logits"] if isinstance(out, dict) else out


def export_torchscript(
    model: torch.nn.Module, path: str, roi_size: Sequence[int], meta_values: Mapping[str, Any] | None = None
) -> str | None:
    """Trace ``model`` and save it to ``path`` (with ``meta_values`` embedded, as MONAI's ``ckpt_export`` does),
    if the trace reproduces the network on inputs it was not traced with.

    A trace records one run of the network: a network whose forward depends on the mask's values (the
    modality-aware network skips the encoders of absent sequences) is not reproduced for other masks. The trace
    is therefore checked against the network on another window size, another mask and a batch of two cases
    with different masks; when any differs or fails, nothing is written.

    Returns:
        ``None`` when ``path`` was written, else why not (also logged).
    """
    from monai.data import save_net_with_metadata

    wrapped = _LogitsOnly(model).eval()
    window = [int(s) for s in roi_size]
    example = (torch.randn(1, len(MODALITIES), *window), torch.tensor([[1.0, 0.0, 1.0, 1.0]]))
    longer = [window[0] + SPATIAL_DIVISOR, *window[1:]]
    checks = [
        (torch.randn(1, len(MODALITIES), *longer), example[1]),
        (torch.randn(1, len(MODALITIES), *window), torch.tensor([[0.0, 0.0, 0.0, 1.0]])),
        (torch.randn(2, len(MODALITIES), *window), torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])),
    ]
    with torch.no_grad(), warnings.catch_warnings():
        # torch marks tracing deprecated; the bundle format still names TorchScript (models/model.ts).
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        reason = None
        try:
            traced = torch.jit.trace(wrapped, example, check_trace=False)
        except Exception as exc:  # tracing fails in many ways (RuntimeError, TypeError, ...): all mean "no .ts"
            reason = f"tracing failed: {_first_line(exc)}"
        for image, mask in checks if reason is None else []:
            what = f"input {tuple(image.shape)} with mask {mask.tolist()}"
            try:
                same = torch.allclose(wrapped(image, mask), traced(image, mask), atol=1e-4, rtol=1e-4)
            except Exception as exc:  # the trace replays the example's branches, which may not fit other inputs
                reason = f"the trace fails on {what} ({_first_line(exc)})"
                break
            if not same:
                reason = f"the trace differs from the network on {what}"
                break
    if reason is not None:
        reason = f"{type(model).__name__} cannot be traced faithfully: {reason}"
        if isinstance(model, ModalityAwareSegNet):
            reason += "; its forward skips the encoders of absent sequences, which a trace cannot record"
        logger.warning("no TorchScript written: %s; use models/model.pt with the network's class", reason)
        return reason
    save_net_with_metadata(traced, path, meta_values=dict(meta_values or {}))
    return None


__all__ = [
    "BUNDLE_COMPONENTS",
    "SCHEMA_URL",
    "check_config_targets",
    "export_torchscript",
    "inference_config",
    "monai_metadata",
    "network_data_format",
]
