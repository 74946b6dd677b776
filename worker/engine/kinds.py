"""The three job kinds behind one interface: a plan made once on one manifest, restricted to a
sub-job's slice of keys, and run into that sub-job's part of the meta job's one commit."""

from compactor.storage.manifest import Manifest
from compactor.worker.engine.image import ImagePlan, plan_image, run_image
from compactor.worker.engine.jobs import CompactionJob
from compactor.worker.engine.l0 import L0Plan, plan_l0, run_l0
from compactor.worker.engine.plan import JobPlan, plan_job
from compactor.worker.engine.run import EngineSettings, Hooks, LayerIO, Result, run

Plan = JobPlan | L0Plan | ImagePlan


def plan_any(manifest: Manifest, job: CompactionJob) -> Plan | str:
    """The plan of ``job`` on ``manifest`` by its kind, or a one-line reason to do nothing."""
    if job.kind == "l0":
        return plan_l0(manifest, job)
    if job.kind == "image":
        return plan_image(manifest, job)
    return plan_job(manifest, job)


def run_any(plan: Plan, io: LayerIO, settings: EngineSettings, hooks: Hooks | None = None) -> Result:
    """One sub-job of ``plan`` (restricted to its slice): uploads, and its part of the proposal."""
    if isinstance(plan, L0Plan):
        return run_l0(plan, io, settings, hooks)
    if isinstance(plan, ImagePlan):
        return run_image(plan, io, settings, hooks)
    return run(plan, io, settings, hooks)


def is_pending(plan: Plan | str) -> bool:
    """Whether work of the kind is left after this plan commits (the seed's ``Pending``)."""
    return isinstance(plan, L0Plan) and plan.pending
