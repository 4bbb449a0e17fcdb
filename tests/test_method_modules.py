"""A method is one module: its declaration (METHOD) is where the client registry, the jobs and the experiments
come from, and the README's "Add a method" example is a working method module."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

from fedbrats.federated.methods import EXPERIMENTS, JOBS, METHOD_DEFINITIONS, METHODS, build_method
from fedbrats.federated.methods.base import ClientMethod, Method
from fedbrats.federated.server.aggregation import STRATEGIES
from fedbrats.jobgen import JOBS as GENERATED_JOBS
from fedbrats.jobgen import job_spec
from fedbrats.networks import NETWORKS, build_network

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_job_and_experiment_comes_from_a_method_module() -> None:
    assert GENERATED_JOBS is JOBS
    declared = {job.name for method in METHOD_DEFINITIONS for job in method.jobs}
    assert (
        declared == set(JOBS) == {"fedavg", "local_only", "centralized", "fedkd", "mstkd", "fedmic", "isofed", "mmccd"}
    )
    for name, job in JOBS.items():
        assert job["training"].get("method", "fedavg") in METHODS.names, name
        STRATEGIES.resolve(job["aggregation"]["path"])  # a registered strategy
        assert job.get("network", {}).get("name", "segresnet") in NETWORKS.names, name
    assert all(job in JOBS for job, _, _ in EXPERIMENTS.values())


def _readme_example() -> types.ModuleType:
    text = README.read_text(encoding="utf-8")
    section = text.split("### Add a method", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("fedprox_example")
    exec(compile(code, "README.md (Add a method)", "exec"), module.__dict__)
    return module


def test_the_readme_add_a_method_example_is_a_working_method() -> None:
    module = _readme_example()
    method_decl = module.METHOD
    assert isinstance(method_decl, Method)
    cls = method_decl.clients["fedprox"]
    assert issubclass(cls, ClientMethod)
    job = method_decl.jobs[0]
    assert job.definition()["training"]["method"] == "fedprox"
    STRATEGIES.resolve(job.aggregation)

    method = cls(mu=0.1)
    model = build_network("segresnet", init_filters=8)
    method.setup(model, ("t1", "t1ce", "t2", "flair"), torch.device("cpu"))
    method.on_global_model(model, {}, 0)
    batch = {
        "image": torch.randn(1, 4, 16, 16, 16),
        "modality_mask": torch.ones(1, 4),
        "label": torch.randint(0, 2, (1, 3, 16, 16, 16)).float(),
    }
    loss, terms = method.training_loss(model, batch, 0)
    assert torch.isfinite(loss) and terms["prox"] == 0.0  # at the global model, the proximal term is zero


def test_jobs_are_built_from_the_method_declarations() -> None:
    assert job_spec("fedkd").training["method"] == "fedkd"
    assert isinstance(build_method("fedavg"), ClientMethod)


def test_moved_class_paths_still_build_and_import() -> None:
    """Jobs and exported bundles written before the architecture step name the old paths."""
    import importlib

    import fedbrats.federated.methods  # noqa: F401 - registers the methods' networks and strategies
    from fedbrats._moved import MOVED_MODULES, MOVED_NAMES
    from fedbrats.federated.methods.fedkd import ModalityAwareAggregation, ModalityAwareSegNet
    from fedbrats.federated.server.aggregation import STRATEGIES
    from fedbrats.networks import NETWORKS

    net = NETWORKS.build("fedbrats.networks.modality_aware.ModalityAwareSegNet", {"init_filters": 4})
    assert isinstance(net, ModalityAwareSegNet)
    assert STRATEGIES.resolve("fedbrats.federated.server.aggregation.ModalityAwareAggregation") is (
        ModalityAwareAggregation
    )
    for old, new in MOVED_MODULES.items():
        assert importlib.import_module(old) is importlib.import_module(new)
    for old, new in MOVED_NAMES.items():
        module, name = old.rsplit(".", 1)
        new_module, new_name = new.rsplit(".", 1)
        assert getattr(importlib.import_module(module), name) is getattr(importlib.import_module(new_module), new_name)
    with pytest.raises(ValueError, match="not a registered network"):
        NETWORKS.path("fedbrats.networks.not_there.Net")
