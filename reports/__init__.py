"""Reports: comparison tables, leaderboards, plots, paper tables and regression verdicts.

The pipeline reads top to bottom:

    ResultStore.results_frame(experiment)         one row per (job, task, metric)   harness/store/database.py
      -> frame.build_table(results, finetune_tasks) a ComparisonTable (pure)          reports/frame.py
      -> markdown / latex / csv / json / html       one pure renderer per format     reports/<format>.py
    plots.py draws figures; paper.py fills paper-table specs (reports/paper/*.yaml); check.py
    compares a results frame to a golden file; commands.py is what the CLI calls (store in, files out).

Scales: scores are stored in lm-eval's own units (accuracy 0-1, BLEU 0-100); every report shows
them in *points* (0-100): fractions times 100, BLEU and chrF as they are (`metrics.py`).
"""
