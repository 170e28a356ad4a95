"""Status derivation cases shared by the status unit tests (tests/unit/test_operator_status.py)
and the GitOps health tests (tests/integration/test_gitops_kstatus.py): what the trainer reports,
and observations with the phase, reason and conditions `derive_status` must give for each."""

from __future__ import annotations

import json

from finetune_operator.api import Reason
from finetune_operator.status import Observed, Problem
from tests.operator.factories import batch_job, condition, pod

SUMMARY_OK = json.dumps(
    {
        "phase": "Succeeded",
        "exitCode": 0,
        "reason": "Completed",
        "message": "done",
        "step": 100,
        "totalSteps": 100,
        "runUri": "s3://runs/team-a/demo/",
        "finalUri": "s3://runs/team-a/demo/final/",
        "evaluations": [
            {"step": 0, "loss": 3.1, "accuracy": 0.41, "perplexity": 22.2},
            {"step": 100, "loss": 2.1, "accuracy": 0.55, "perplexity": 8.2},
        ],
        "checkpoints": [
            {
                "step": 100,
                "uri": "s3://runs/team-a/demo/checkpoints/step-000100/",
                "time": "2026-11-29T06:20:00Z",
                "metrics": {"evalLoss": 2.1},
            }
        ],
    }
)
SUMMARY_EVALUATED = json.dumps(
    {
        "phase": "Succeeded",
        "exitCode": 0,
        "reason": "Completed",
        "message": "evaluated: eval loss 2.2000, token accuracy 0.5500, perplexity 9.025",
        "step": 0,
        "totalSteps": 0,
        "runUri": "s3://runs/team-a/demo/",
        "evaluations": [{"step": 0, "loss": 2.2, "accuracy": 0.55, "perplexity": 9.025}],
        "baselines": [{"model": "pythia-160m", "loss": 2.9, "accuracy": 0.44, "perplexity": 18.2}],
        "checkpoints": [],
    }
)
EVALUATE = {
    "mode": "Evaluate",
    "hyperparameters": None,
    "dataset": {"eval": ["s3://data/reuters/eval.jsonl"]},
}
SUMMARY_INVALID = json.dumps(
    {
        "phase": "Failed",
        "exitCode": 3,
        "reason": "InvalidData",
        "message": "train.jsonl line 3: no field 'text'",
        "step": 0,
        "totalSteps": None,
        "runUri": None,
    }
)

CASES = [
    # id, spec overrides, observed, expected (phase, reason, Ready, Reconciling, Stalled), message fragment
    ("no-job-yet", {}, Observed(), ("Pending", "Creating", "False", "True", "False"), "creating"),
    (
        "job-no-pods",
        {},
        Observed(batch_job=batch_job()),
        ("Pending", "WaitingForPods", "False", "True", "False"),
        "waiting",
    ),
    (
        "pod-pending",
        {},
        Observed(batch_job=batch_job(active=1), pods=[pod(phase="Pending")]),
        ("Pending", "WaitingForPods", "False", "True", "False"),
        "waiting",
    ),
    (
        "running",
        {},
        Observed(batch_job=batch_job(active=1), pods=[pod()]),
        ("Running", "Training", "False", "True", "False"),
        "1/1 pod(s) running",
    ),
    (
        "evaluating",
        EVALUATE,
        Observed(batch_job=batch_job(active=1), pods=[pod()]),
        ("Running", "Evaluating", "False", "True", "False"),
        "evaluating: 1/1 pod(s) running",
    ),
    (
        "evaluated",
        EVALUATE,
        Observed(
            batch_job=batch_job(succeeded=1, conditions=[condition("Complete")]),
            pods=[pod(phase="Succeeded", exit_code=0, message=SUMMARY_EVALUATED)],
        ),
        ("Succeeded", "Succeeded", "True", "False", "False"),
        "evaluation finished: eval loss 2.2000, token accuracy 0.5500, perplexity 9.025",
    ),
    (
        "running-partial",
        {"resources": {"nodes": 2}},
        Observed(batch_job=batch_job(active=2), pods=[pod(0), pod(1, phase="Pending")]),
        ("Running", "Training", "False", "True", "False"),
        "1/2 pod(s)",
    ),
    (
        "succeeded",
        {},
        Observed(
            batch_job=batch_job(
                succeeded=1,
                conditions=[condition("SuccessCriteriaMet"), condition("Complete")],
                completion_time="2026-11-29T06:21:00Z",
            ),
            pods=[pod(phase="Succeeded", exit_code=0, message=SUMMARY_OK)],
        ),
        ("Succeeded", "Succeeded", "True", "False", "False"),
        "final model in s3://runs/team-a/demo/final/",
    ),
    (
        "invalid-input",
        {},
        Observed(
            batch_job=batch_job(
                failed=1,
                conditions=[
                    condition(
                        "Failed",
                        "PodFailurePolicy",
                        "Container trainer for pod team-a/demo-0 failed with exit code 3 matching FailJob rule at index 0",
                    )
                ],
            ),
            pods=[pod(phase="Failed", exit_code=3, message=SUMMARY_INVALID)],
        ),
        ("Failed", "InvalidInput", "False", "False", "True"),
        "exit code 3 (InvalidData): train.jsonl line 3: no field 'text'",
    ),
    (
        "failure-target-counts-as-failed",
        {},
        Observed(
            batch_job=batch_job(failed=1, conditions=[condition("FailureTarget", "PodFailurePolicy")]),
            pods=[pod(phase="Failed", exit_code=3)],
        ),
        ("Failed", "InvalidInput", "False", "False", "True"),
        "not retried",
    ),
    (
        "backoff-exceeded",
        {},
        Observed(
            batch_job=batch_job(
                failed=4,
                conditions=[
                    condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
                ],
            ),
            pods=[
                pod(
                    phase="Failed",
                    exit_code=1,
                    message="Traceback ... CUDA OOM",
                    finished_at=f"2026-11-29T06:1{i}:00Z",
                )
                for i in range(4)
            ],
        ),
        ("Failed", "BackoffLimitExceeded", "False", "False", "True"),
        "exit code 1 (Error): Traceback ... CUDA OOM",
    ),
    (
        "deadline",
        {},
        Observed(
            batch_job=batch_job(
                conditions=[
                    condition("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
                ]
            )
        ),
        ("Failed", "DeadlineExceeded", "False", "False", "True"),
        "activeDeadlineSeconds",
    ),
    (
        "suspended",
        {"suspend": True},
        Observed(batch_job=batch_job(suspend=True)),
        ("Suspended", "Suspended", None, "False", "False"),  # no Ready: Current for kstatus
        "set it to false to resume",
    ),
    (
        "suspending",
        {"suspend": True},
        Observed(batch_job=batch_job(suspend=True), pods=[pod()]),
        ("Suspended", "Suspending", None, "True", "False"),
        "saving a checkpoint",
    ),
    (
        "cancelling",
        {"cancel": True},
        Observed(batch_job=batch_job(suspend=True), pods=[pod()]),
        ("Running", "Cancelling", "False", "True", "False"),
        "cancelling",
    ),
    (
        "cancelled",
        {"cancel": True},
        Observed(batch_job=batch_job(suspend=True)),
        ("Cancelled", "Cancelled", "False", "False", "True"),
        "checkpoints are kept",
    ),
    (
        "missing-secret",
        {},
        Observed(
            batch_job=batch_job(active=1),
            pods=[pod(phase="Pending", waiting=("CreateContainerConfigError", 'secret "s3" not found'))],
        ),
        ("Pending", "SecretNotFound", "False", "False", "True"),
        'secret "s3" not found',
    ),
    (
        "bad-image",
        {},
        Observed(
            batch_job=batch_job(active=1),
            pods=[pod(phase="Pending", waiting=("ImagePullBackOff", "no such image"))],
        ),
        ("Pending", "ImagePullFailed", "False", "False", "True"),
        "no such image",
    ),
    (
        "operator-invalid-spec",
        {},
        Observed(
            problem=Problem(Reason.INVALID_SPEC, "invalid spec: spec.model.name: unknown", permanent=True)
        ),
        ("Failed", "InvalidSpec", "False", "False", "True"),
        "unknown",
    ),
    (
        "name-conflict",
        {},
        Observed(problem=Problem(Reason.NAME_CONFLICT, "Job 'demo' exists", permanent=False)),
        ("Pending", "NameConflict", "False", "False", "True"),
        "exists",
    ),
]
