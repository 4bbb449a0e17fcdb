"""NVFlare executor that runs the package's Client API script with the job's training options.

A job config names this class instead of NVFlare's ``ClientAPIExecutor`` so that jobs hold configuration
only: the script lives in the installed package, not in a copy under the job's ``app/custom``.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

from fedbrats.federated.client.trainer import TrainConfig
from fedbrats.federated.memory import SITE_GC_ROUNDS

SCRIPT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_script.py")


def encode_config(config: dict[str, Any]) -> str:
    """Training options as one whitespace-free token (NVFlare splits script arguments on whitespace)."""
    return base64.urlsafe_b64encode(json.dumps(config, sort_keys=True).encode()).decode()


def decode_config(token: str) -> dict[str, Any]:
    """Inverse of :func:`encode_config`."""
    return json.loads(base64.urlsafe_b64decode(token.encode()).decode())


class FedBratsExecutor(ClientAPIExecutor):
    """Client API executor (in-process) for :mod:`fedbrats.federated.client.train_script`.

    Args:
        training: the job's training options (see :class:`fedbrats.federated.client.trainer.TrainConfig`);
            validated here, so a typo fails when the job starts, naming the option.
        train_task_name: name of the training task.
        evaluate_task_name: name of the validation task.
        params_transfer_type: ``FULL`` weights or ``DIFF`` (differences to the received global model, which
            NVFlare's privacy filters on weight differences, e.g. ``SVTPrivacy``, need).
        memory_gc_rounds: NVFlare's Client API memory clean-up (``gc.collect`` and ``malloc_trim``) after every
            this many results sent (0: never); the training script also returns free heap pages to the operating
            system after every round. See :mod:`fedbrats.federated.memory`.
    """

    def __init__(
        self,
        training: dict[str, Any] | None = None,
        train_task_name: str = "train",
        evaluate_task_name: str = "validate",
        params_transfer_type: str = "FULL",
        memory_gc_rounds: int = SITE_GC_ROUNDS,
    ) -> None:
        TrainConfig.from_dict(training)  # fail early on bad options
        self.training = dict(training or {})
        self.memory_gc_rounds = memory_gc_rounds
        super().__init__(
            execution_mode="in_process",
            task_script_path=SCRIPT_PATH,
            task_script_args="",
            params_exchange_format="pytorch",
            train_task_name=train_task_name,
            evaluate_task_name=evaluate_task_name,
            params_transfer_type=params_transfer_type,
            memory_gc_rounds=memory_gc_rounds,
        )

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            # The site's workspace root is where a startup kit keeps local/ settings (data paths, modalities).
            workspace = fl_ctx.get_engine().get_workspace()
            root = workspace.get_root_dir()
            # The job's run folder at this site (as the payload audit finds it): site-local state of a method
            # (never sent) and the site's events file.
            run_dir = workspace.get_run_dir(fl_ctx.get_job_id())
            self._task_script_args = f"--training {encode_config(self.training)} --workspace {root} --run-dir {run_dir}"
        super().handle_event(event_type, fl_ctx)
