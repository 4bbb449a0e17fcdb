"""Score a trained model on every one of the 15 non-empty combinations of MRI sequences.

Every test case is loaded once with all four sequences; each combination is then simulated by zero-filling the
channels of the absent sequences and telling the network which ones are present, which is exactly what a site
that lacks those sequences feeds the network (absent channels are zero after the per-channel normalisation of
non-zero voxels). One table therefore shows how much each sequence matters to a model and how gracefully the
model degrades when sequences are missing.

The scoring loop itself is :func:`fedbrats.scoring.combinations.evaluate_combinations` (a site's part of the federated
evaluation runs it too); this module is the command around it. Also here: turning a checkpoint, a federated run
folder or an exported model folder into a ready network
(:func:`load_model`), used by the prediction and export commands too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import fedbrats.federated.methods  # noqa: F401 - registers the methods' own networks and strategies
from fedbrats.commands import run_command
from fedbrats.data.loader import DataConfig
from fedbrats.networks import build_from_spec
from fedbrats.precision import PRECISIONS
from fedbrats.runs import (
    EXPORTED_PREPROCESSING_KEY,
    ModelFolder,
    RunFolder,
    find_model_spec,
    load_state_dict,
    read_json,
    read_model_metadata,
    resolve_checkpoint,
    spec_from_json,
    verify_exported_model,
)
from fedbrats.scoring import metrics
from fedbrats.scoring.combinations import (  # noqa: F401 - the scoring loop's names, as the commands import them
    FULL_COMBINATION,
    datalist_convention,
    evaluate_combinations,
    lesion_wise_params,
    mean_over_rows,
    table_row,
)
from fedbrats.scoring.postprocess import read_postprocessing

logger = logging.getLogger(__name__)


# ---- models -----------------------------------------------------------------------------------------------
def load_model(
    checkpoint: str, spec: dict[str, Any] | str | None = None, *, verify_integrity: bool = True
) -> torch.nn.Module:
    """Build the network a checkpoint belongs to and load its weights (evaluation mode, on the CPU).

    Args:
        checkpoint: a ``.pt`` file, a federated run folder or an exported model folder (see
            :func:`resolve_checkpoint`).
        spec: ``{"path": ..., "args": ...}`` of the network, or a path to ``model_spec.json`` /
            ``metadata.json``; ``None`` looks for one next to the checkpoint (see :func:`find_model_spec`).
        verify_integrity: check an exported ``model.pt`` against its recorded ``model_sha256`` (see
            :func:`verify_exported_model`); ``False`` skips it (``--skip-integrity-check``).

    Raises:
        ValueError: the checkpoint or spec is missing or unreadable, an exported model's checksum does not
            match, or the weights do not fit the network.
    """
    path = resolve_checkpoint(checkpoint)
    if verify_integrity:
        if verify_exported_model(path):
            logger.info("%s matches the model_sha256 of its metadata.json", path)
    else:
        logger.warning("integrity check of %s skipped (--skip-integrity-check)", path)
    if spec is None:
        spec_source = find_model_spec(path)
        spec = spec_from_json(spec_source)
    elif isinstance(spec, str):
        if not os.path.isfile(spec):
            raise ValueError(f"model spec {spec!r} does not exist")
        spec_source = spec
        spec = spec_from_json(spec)
    elif isinstance(spec, Mapping):
        spec_source = "the given spec"
        spec = dict(spec)
    else:
        raise ValueError(f"spec must be a dict, a path or None, got {type(spec).__name__}")
    try:
        model = build_from_spec(spec)
    except (TypeError, ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"cannot build the network described by {spec_source} ({spec.get('path')!r}): {exc}") from exc
    state = load_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint {path!r} does not fit the network {spec.get('path')!r} described by {spec_source}: {exc}"
        ) from exc
    model.eval()
    logger.info("loaded %s from %s", spec.get("path"), path)
    return model


def run_data_options(checkpoint: str) -> tuple[DataConfig, str] | None:
    """The data options a federated run trained with, read from the job configuration in its run folder.

    The run folder is looked for from the checkpoint's folder up to two parents (``app_server/*.pt``,
    ``site_models/*.pt``); NVFlare keeps the job's site configuration there (:attr:`RunFolder.client_config`).

    Returns:
        ``(options, path of the configuration)``, or ``None`` when no run configuration is found.

    Raises:
        ValueError: the configuration exists but holds no training options or invalid ones (the file is named).
    """
    folder = os.path.abspath(checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint))
    for _ in range(3):
        path = RunFolder(folder).client_config
        if os.path.isfile(path):
            break
        folder = os.path.dirname(folder)
    else:
        return None
    config = read_json(path, "job configuration")
    executors = config.get("executors", []) if isinstance(config, dict) else []
    for entry in executors:
        executor = entry.get("executor") if isinstance(entry, dict) else None
        args = executor.get("args") if isinstance(executor, dict) else None
        if isinstance(args, dict) and isinstance(args.get("training"), dict):
            try:
                return DataConfig.from_dict(args["training"].get("data")), path
            except (TypeError, ValueError) as exc:
                raise ValueError(f"job configuration {path!r}: bad data options: {exc}") from None
    raise ValueError(f"job configuration {path!r} holds no executor with 'training' options to read the data options")


def recorded_preprocessing(model: str) -> dict[str, Any]:
    """The preprocessing a model was trained with, as recorded beside it, so that nobody has to type it again.

    Looked for in an exported model's ``metadata.json`` (``preprocessing``; ``inputs.image`` of earlier exports),
    else in the run's job configuration (:func:`run_data_options`).

    Args:
        model: a checkpoint, run folder or exported model folder (resolved with :func:`resolve_checkpoint`).

    Returns:
        ``{"roi_size": (x, y, z), "zoom": z, "source": file}`` (training crop, which is also the sliding window,
        and resampling factor), or ``{}`` when nothing is recorded.
    """
    checkpoint = resolve_checkpoint(model)
    metadata = read_model_metadata(checkpoint)
    source = ModelFolder.metadata_of(checkpoint)
    recorded = metadata.get(EXPORTED_PREPROCESSING_KEY)
    if not isinstance(recorded, Mapping):
        inputs = metadata.get("inputs")
        recorded = inputs.get("image") if isinstance(inputs, Mapping) else None
    if isinstance(recorded, Mapping) and recorded.get("zoom") and recorded.get("roi_size"):
        return {
            "roi_size": tuple(int(s) for s in recorded["roi_size"]),
            "zoom": float(recorded["zoom"]),
            "source": source,
        }
    found = run_data_options(checkpoint)
    if found is None:
        return {}
    options, path = found
    return {"roi_size": tuple(options.roi_size), "zoom": float(options.zoom), "source": path}


def preprocessing_options(
    model: str, roi_size: Sequence[int] | None, zoom: float | None, what: str
) -> tuple[tuple[int, ...], float]:
    """The sliding window and zoom to run ``model`` with: the options given, else the recorded ones.

    An explicit ``zoom`` other than the recorded one is used but warned about (the model would see its cases at
    another scale than in training), and so is a window other than the training crop (group or instance
    normalisation computes its statistics over the window, so a larger window with more background changes what
    every layer sees); without any record the :class:`DataConfig` defaults are used, with a warning.

    Args:
        model: checkpoint, run folder or exported model folder.
        roi_size: ``--roi-size`` (None: the recorded training crop).
        zoom: ``--zoom`` (None: the recorded one).
        what: the command, for the messages (``"predict"``).
    """
    recorded = recorded_preprocessing(model)
    defaults = DataConfig()
    if not recorded:
        logger.warning(
            "%s: no training preprocessing recorded for %s (no exported metadata.json, no run configuration); "
            "using zoom %s and window %s unless --zoom / --roi-size say otherwise",
            what,
            model,
            zoom if zoom is not None else defaults.zoom,
            list(roi_size or defaults.roi_size),
        )
    elif zoom is not None and abs(zoom - recorded["zoom"]) > 1e-9:
        logger.warning(
            "%s: --zoom %s differs from the zoom %s the model was trained with (%s); its cases will be seen at "
            "another scale",
            what,
            zoom,
            recorded["zoom"],
            recorded["source"],
        )
    if recorded and roi_size and tuple(int(s) for s in roi_size) != tuple(recorded["roi_size"]):
        logger.warning(
            "%s: --roi-size %s differs from the crop %s the model was trained on (%s); its normalisation layers "
            "see other statistics in a window of another size, which can lower Dice a lot (a 96^3 window cost a "
            "64^3-trained SegResNet 0.18 validation WT Dice in docs/results.md)",
            what,
            list(roi_size),
            list(recorded["roi_size"]),
            recorded["source"],
        )
    chosen_zoom = zoom if zoom is not None else recorded.get("zoom", defaults.zoom)
    chosen_roi = tuple(roi_size) if roi_size else recorded.get("roi_size", defaults.roi_size)
    checked = DataConfig(roi_size=chosen_roi, zoom=chosen_zoom)  # the same rules as a job's data options
    if recorded:
        logger.info(
            "%s: zoom %s, window %s (recorded in %s)", what, checked.zoom, list(checked.roi_size), recorded["source"]
        )
    return tuple(checked.roi_size), float(checked.zoom)


def check_device(device: str | torch.device) -> torch.device:
    """The torch device named by ``--device``, after checking that this machine has it.

    Raises:
        ValueError: a malformed device name, or a CUDA device on a machine without one (torch would fail later
            with an ``AssertionError`` traceback).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no usable CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return dev


# ---- evaluation -------------------------------------------------------------------------------------------
# ---- command line -----------------------------------------------------------------------------------------
def default_test_datalist(sites: str | None = None, what: str = "evaluate") -> str:
    """The ``test_datalist`` of a ``sites.json`` (default: ``FEDBRATS_SITE_CONFIG``'s, else the embedded one's).

    Args:
        sites: the ``--sites`` option, if given.
        what: the command, for the log line saying which file it uses.
    """
    from fedbrats.data.site_config import federation_sites_file

    sites = federation_sites_file(sites, what)
    manifest = read_json(sites, "sites file")
    path = manifest.get("test_datalist") if isinstance(manifest, dict) else None
    if not path:
        raise ValueError(f"sites file {sites!r} names no 'test_datalist'; pass --datalist")
    return path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(sites)), path)


def roi_option(values: Sequence[int] | None) -> tuple[int, ...] | None:
    """``--roi-size`` as three sizes (one value: a cube), or ``None`` when not given.

    Raises:
        ValueError: neither one nor three values.
    """
    if not values:
        return None
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) != 3:
        raise ValueError(f"--roi-size takes one or three integers, got {list(values)}")
    return tuple(values)


#: What ``fedbrats evaluate`` does (its ``--help``).
EVALUATE_DESCRIPTION = "Score a model on the test cases with each of the 15 combinations of MRI sequences."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedbrats evaluate`` options."""
    parser.add_argument("--model", required=True, help="checkpoint (.pt), federated run folder or exported model")
    parser.add_argument("--spec", default=None, help="model_spec.json (default: found next to the model)")
    parser.add_argument("--datalist", default=None, help="datalist with the test cases (default: --sites' test set)")
    parser.add_argument(
        "--sites",
        default=None,
        help="sites.json whose test_datalist to use (default: $FEDBRATS_SITE_CONFIG, else the embedded federation)",
    )
    parser.add_argument("--key", default="test", help="list of the datalist to evaluate (default: test)")
    parser.add_argument("--roi-size", type=int, nargs="+", default=None, help="sliding-window size (1 or 3 ints)")
    parser.add_argument(
        "--zoom", type=float, default=None, help="resampling factor after cropping (default: the model's training one)"
    )
    parser.add_argument("--max-eval-size", type=int, default=0, help="centre-crop volumes to this side (0: never)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument(
        "--skip-integrity-check",
        action="store_true",
        help="load an exported model.pt even if it does not match the model_sha256 of its metadata.json",
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="inference precision (fp32: the reference)"
    )
    parser.add_argument(
        "--min-component-voxels",
        type=int,
        default=None,
        help="remove smaller connected components (default: the size chosen on validation in the run/model folder)",
    )
    parser.add_argument(
        "--lesion-wise",
        nargs="?",
        const="GLI",
        default=None,
        choices=sorted(metrics.BRATS_LESION_PARAMS),
        help="also report BraTS 2023's lesion-wise Dice/HD95 with the parameters of that challenge (default GLI: "
        "dilation 3, lesions > 50 mm^3)",
    )
    parser.add_argument("--out-dir", default=None, help="where results.json/.md and heatmaps go (default: none)")
    parser.add_argument("--label", default=None, help="name of the model in the report (default: the model path)")
    parser.add_argument("--max-cases", type=int, default=0, help="use only the first N cases (0: all)")


def run(args: argparse.Namespace) -> int:
    """Run ``fedbrats evaluate`` with parsed options (errors: :func:`fedbrats.commands.run_command`)."""
    check_device(args.device)
    model = load_model(args.model, args.spec, verify_integrity=not args.skip_integrity_check)
    # The model's folder (exported metadata or run configuration) records the window and resampling it was
    # trained with; the options override them.
    roi, zoom = preprocessing_options(args.model, roi_option(args.roi_size), args.zoom, "evaluate")
    data: dict[str, Any] = {"max_eval_size": args.max_eval_size, "roi_size": roi, "zoom": zoom}
    datalist = args.datalist or default_test_datalist(args.sites)
    label = args.label or os.path.basename(os.path.normpath(args.model))
    results = evaluate_combinations(
        model,
        datalist,
        key=args.key,
        data=data,
        overlap=args.overlap,
        device=args.device,
        max_cases=args.max_cases,
        model_name=label,
        precision=args.precision,
        min_component_voxels=read_postprocessing(resolve_checkpoint(args.model), args.min_component_voxels),
        lesion_wise=args.lesion_wise,
    )
    from fedbrats.evaluation.report import format_table, write_reports

    logger.info("results of %s on %d case(s):\n%s", label, results["num_cases"], format_table(results))
    if args.lesion_wise:
        logger.info("lesion-wise (BraTS 2023, %s):\n%s", args.lesion_wise, format_table(results, "lesion_wise"))
    if args.out_dir:
        paths = write_reports(results, args.out_dir, label=label)
        logger.info("wrote %s", ", ".join(paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``evaluate`` command.

    Returns:
        0 on success, 1 when the model, the data or the options are wrong (the reason is logged).
    """
    return run_command("evaluate", add_arguments, run, argv, EVALUATE_DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
