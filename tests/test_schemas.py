"""The machine-readable outputs validate against the JSON Schemas shipped in the package
(docs/design.md §7): a real audit record, real alert lines and a real compare summary.json, and
each schema rejects a record that breaks the contract (so these tests can fail)."""
import copy
import json

import jsonschema
import pytest
import torch

from loopdyn import dynamics
from loopdyn.cli import main
from loopdyn.models import LoopConfig, LoopedLM
from loopdyn.schemas import KINDS, schema, validate


def test_every_schema_is_a_valid_draft_2020_12_schema():
    for kind in KINDS:
        jsonschema.Draft202012Validator.check_schema(schema(kind))
    with pytest.raises(ValueError, match="kind must be one of"):
        schema("nope")


@pytest.fixture(scope="module")
def audit_records():
    torch.manual_seed(0)
    out = []
    for injection in ("linear", "autonomous"):  # with and without an LTI part (injection nulls)
        model = LoopedLM(LoopConfig.preset("tiny", injection=injection)).eval()
        idx = torch.randint(0, 256, (1, 16))
        out.append(json.loads(json.dumps(dynamics.audit(model, idx).to_json())))
    return out


def test_audit_records_validate(audit_records):
    for record in audit_records:
        validate("audit", record)
    assert audit_records[1]["injection"]["spectral_radius"] is None  # the no-LTI case was exercised


@pytest.mark.parametrize("breach", ["verdict", "missing", "eigenvalue", "loops"])
def test_audit_schema_rejects_a_broken_record(audit_records, breach):
    record = copy.deepcopy(audit_records[0])
    if breach == "verdict":
        record["verdict"] = "fine"
    elif breach == "missing":
        del record["forecast"]["max_safe_loops"]
    elif breach == "eigenvalue":
        record["injection"]["eigenvalues"][0] = [1.0]
    else:
        record["trajectory"]["loops"][0] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate("audit", record)


def test_alert_lines_of_a_real_run_validate(tmp_path):
    alerts = tmp_path / "alerts.jsonl"
    code = main(["train", "--preset", "tiny", "--injection", "linear", "--lr", "0.2", "--steps", "25",
                 "--batch-size", "4", "--seq-len", "32", "--alerts", str(alerts), "--no-progress",
                 "--threads", "1"])
    assert code == 0
    lines = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert lines, "the run raised no alert: the schema was not exercised"
    for line in lines:
        validate("alert", line)
    broken = dict(lines[0], kind="early_warning")  # a kind retired in round 2
    with pytest.raises(jsonschema.ValidationError):
        validate("alert", broken)


def test_compare_summary_validates():
    """A real summary.json is validated in tests/test_compare.py's end-to-end run (one compare run
    serves both); here the schema must reject an outcome outside the table and a missing field."""
    run = {"name": "diagonal-lr0.01-seed0", "injection": "diagonal", "lr": 0.01, "seed": 0, "params": 1,
           "mean_loops": 4, "steps": 2, "outcome": "converged", "outcome_reason": "", "val_by_loops": {"4": 3.0},
           "audit_verdict": "stable", "alerts": 0}
    good = {"setup": {}, "unit": "nats/byte", "criteria": {}, "matrix": {}, "findings": [], "runs": [run]}
    validate("summary", good)
    for bad in ({**good, "runs": [{**run, "outcome": "exploded"}]}, {k: v for k, v in good.items() if k != "runs"}):
        with pytest.raises(jsonschema.ValidationError):
            validate("summary", bad)
