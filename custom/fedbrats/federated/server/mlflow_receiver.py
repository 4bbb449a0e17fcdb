"""NVFlare's MLflow receiver with a run for the server's own curves (needs the optional ``mlflow`` extra).

NVFlare's :class:`~nvflare.app_opt.tracking.mlflow.mlflow_receiver.MLflowReceiver` opens one MLflow run per site
and files each record under the site that sent it; a record the server logs itself (the global model's aggregate
validation, see :mod:`fedbrats.federated.tracking`) would find no run and be dropped with an error. This subclass
opens one more run, under the server's name, and is otherwise NVFlare's.

Importing this module imports ``mlflow``; :func:`fedbrats.recipe.tracking_receiver` does so only for jobs that
track to MLflow, so the package works without it.
"""

from __future__ import annotations

from nvflare.apis.analytix import TrackConst
from nvflare.apis.fl_constant import ProcessType
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver


class FedBratsMLflowReceiver(MLflowReceiver):
    """:class:`MLflowReceiver` with an MLflow run for the server as well as one per site.

    Args: those of :class:`MLflowReceiver` (``tracking_uri`` None: NVFlare's default, an SQLite store
    ``mlflow.db`` in the server's job result folder).
    """

    def initialize(self, fl_ctx: FLContext) -> None:
        super().initialize(fl_ctx)
        if fl_ctx.get_process_type() != ProcessType.SERVER_JOB:
            return
        server = fl_ctx.get_identity_name()
        if server and server not in self.run_ids:
            # The same experiment, tags and run naming as the sites' runs (NVFlare's own set-up, for one more name).
            experiment_name = self.kw_args.get(TrackConst.EXPERIMENT_NAME, "FLARE FL Experiment")
            experiment_tags = self._get_tags(TrackConst.EXPERIMENT_TAGS, kwargs=self.kw_args)
            art_full_path = self._get_artifact_location(self.artifact_location, fl_ctx)
            self._mlflow_setup(art_full_path, experiment_name, experiment_tags, [server], fl_ctx)
            self._init_buffer([server])
