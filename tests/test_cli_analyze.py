"""`merge-harness analyze ...` on an experiment file, through the real CLI."""

from __future__ import annotations

import subprocess
import sys

from tests.calibrated_zoo import make_zoo


def experiment_yaml(zoo: dict, path, with_calibration: bool = True) -> str:
    finetunes = "\n".join(
        f"  {task}: {{model: {zoo[task]}"
        + (f", calibration: {zoo[task + '.jsonl']}" if with_calibration else "")
        + "}"
        for task in ("math", "qa")
    )
    path.write_text(
        f"name: analyze\nbase_model: {zoo['base']}\nfinetunes:\n{finetunes}\ntasks: [gsm8k_fixture]\n"
    )
    return str(path)


def analyze(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "merge_harness", "analyze", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_analyze_linearity_writes_the_table_and_plot(tmp_path):
    zoo = make_zoo(tmp_path / "zoo", tasks=("math", "qa"))
    config = experiment_yaml(zoo, tmp_path / "e.yaml")
    result = analyze(
        "linearity", config, "--out", str(tmp_path / "out"), "--num-samples", "4", "--template", "plain"
    )
    assert result.returncode == 0, result.stderr
    written = [line.split("written: ")[1] for line in result.stdout.splitlines() if "written: " in line]
    assert any(p.endswith(".md") for p in written) and any(p.endswith(".png") for p in written)


def test_analyze_without_calibration_data_is_a_one_line_error(tmp_path):
    zoo = make_zoo(tmp_path / "zoo", tasks=("math", "qa"))
    config = experiment_yaml(zoo, tmp_path / "e.yaml", with_calibration=False)
    result = analyze("search", config, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "need `calibration:` data" in result.stderr and "Traceback" not in result.stderr


def test_analyze_zoo_refuses_an_unknown_zoo_or_variant_in_one_line(tmp_path):
    unknown_zoo = analyze("zoo", "--zoo", "llama", "--zoo-dir", str(tmp_path), "--out", str(tmp_path / "d"))
    assert unknown_zoo.returncode == 2 and "unknown zoo 'llama'" in unknown_zoo.stderr
    assert "Traceback" not in unknown_zoo.stderr and not (tmp_path / "d").exists()
