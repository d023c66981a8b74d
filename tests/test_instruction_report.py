"""benchmarks/results/instructions/report.md is generated from the JSON results beside it
(not edited by hand): rebuilding it gives the committed file, and every shipped instruction
has its results."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "instructions"


def _runner():
    spec = importlib.util.spec_from_file_location(
        "run_instructions", ROOT / "benchmarks" / "run_instructions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_is_generated_from_results():
    runner = _runner()
    runner.OUT = RESULTS
    assert runner.report() == (RESULTS / "report.md").read_text()


def test_every_instruction_has_results_with_intervals():
    from fasteer.evaluate.instructions import names
    for name in names():
        data = json.loads((RESULTS / f"{name}.json").read_text())
        assert set(data["conditions"]) == set(_runner().CONDITIONS)
        for cond in data["conditions"].values():
            c = cond["compliance"]
            assert 0 <= c["low"] <= c["mean"] <= c["high"] <= 1
            assert cond["n"] == data["settings"]["n_test"]
        assert (RESULTS / "vectors" / f"{name}.safetensors").is_file()
