"""The chart's PrometheusRule, checked and unit-tested by the real promtool (finetune_dev.binaries).

`helm template` renders the rule with the chart's defaults; `promtool check rules` validates it and
`promtool test rules` feeds it series shaped like the operator's and the trainers' (the labels
the chart's ServiceMonitor and PodMonitor give them) and checks which alerts fire, and when.
tests/e2e/test_prometheus.py loads the same rule into a running server.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from finetune_dev import binaries
from tests.prometheus_env import promtool, rule_file

CHART = Path(__file__).resolve().parents[2] / "helm" / "finetune-operator"


def rendered_rule(*values: str) -> dict[str, Any]:
    out = subprocess.run(
        [
            str(binaries.binary("helm")),
            "template",
            "release",
            str(CHART),
            "--set",
            "metrics.prometheusRule.enabled=true",
            *values,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [rule] = [doc for doc in yaml.safe_load_all(out) if doc and doc["kind"] == "PrometheusRule"]
    return dict(rule)


def _alert(name: str, job: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": "warning", "namespace": "team-a", "finetunejob": job},
        "exp_annotations": {"summary": summary, "description": description},
    }


def test_rules_are_valid_and_fire_when_they_should(tmp_path: Path) -> None:
    rules = rule_file(rendered_rule(), tmp_path / "rules.yaml")
    checked = promtool("check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 3 rules found" in checked.stdout

    trainer = 'namespace="team-a", pod="{job}-0-abcde", job="team-a/finetune-trainers", finetunejob="{job}"'
    stuck_text = "Its rank-0 trainer is up but finetune_step has not moved (stuck collective, stalled data source, or a long evaluation)."
    upload_text = "The trainer restarts from its newest uploaded checkpoint; check the storage endpoint, bucket and credentials Secret."
    failed_text = "kubectl describe ftj -n team-a broken shows the reason and message."
    tests = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # The operator's series (honorLabels: the job's namespace).
                    {"series": 'finetune_operator_job_phase{namespace="team-a", finetunejob="broken", phase="Failed"}', "values": "1x60"},
                    {"series": 'finetune_operator_job_phase{namespace="team-a", finetunejob="fine", phase="Running"}', "values": "1x60"},
                    # Steps stop at 3 after 3 minutes; the other job keeps training.
                    {"series": f"finetune_step{{{trainer.format(job='stuck')}}}", "values": "0 1 2 3x60"},
                    {"series": f"finetune_step{{{trainer.format(job='fine')}}}", "values": "0+1x60"},
                    # One failed upload at minute 2; the pod is gone (no series) from minute 5.
                    {"series": f"finetune_checkpoint_upload_failures_total{{{trainer.format(job='fine')}}}", "values": "0 0 1 1 1 _x55"},
                ],
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "FineTuneJobFailed", "exp_alerts": [
                        _alert("FineTuneJobFailed", "broken", "FineTuneJob team-a/broken failed", failed_text)
                    ]},
                    # No step since minute 3: the 5-minute window is empty of changes from minute 8,
                    # and the alert fires 30 minutes (noProgressFor) later.
                    {"eval_time": "37m", "alertname": "FineTuneJobNoProgress", "exp_alerts": []},
                    {"eval_time": "39m", "alertname": "FineTuneJobNoProgress", "exp_alerts": [
                        _alert("FineTuneJobNoProgress", "stuck", "FineTuneJob team-a/stuck has made no optimizer step for 30m", stuck_text)
                    ]},
                    {"eval_time": "10m", "alertname": "FineTuneCheckpointUploadsFailing", "exp_alerts": [
                        _alert("FineTuneCheckpointUploadsFailing", "fine", "FineTuneJob team-a/fine failed to upload a checkpoint in the last 15m", upload_text)
                    ]},
                    {"eval_time": "25m", "alertname": "FineTuneCheckpointUploadsFailing", "exp_alerts": []},
                ],
            }
        ],
    }  # fmt: skip
    test_file = tmp_path / "rules_test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_no_progress_threshold_follows_the_values(tmp_path: Path) -> None:
    rule = rendered_rule("--set", "metrics.prometheusRule.noProgressFor=45m")
    [no_progress] = [r for r in rule["spec"]["groups"][0]["rules"] if r["alert"] == "FineTuneJobNoProgress"]
    assert no_progress["for"] == "45m"
    checked = promtool("check", "rules", str(rule_file(rule, tmp_path / "rules.yaml")))
    assert checked.returncode == 0, checked.stdout + checked.stderr
