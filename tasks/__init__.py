"""lm-eval task definitions: one folder per task, a YAML per variant plus a small `utils.py`.

`merge_harness.evaluate.evaluator` registers this folder with lm-eval (`TaskManager(include_path=TASKS_DIR)`).
Every custom task has a `<name>_fixture` variant that `include:`s the real YAML and swaps only
the data for a small JSONL file in the real schema under `fixtures/`, so it runs offline.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
