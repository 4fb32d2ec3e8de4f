"""Diagnostics of task arithmetic: is the model (or a submodule) linear in its weights, do task
vectors interfere, and which merge coefficient should one pick without looking at test data.

One module per analysis, each with a `*_report` function the CLI calls:

- `linearity`: SLTA's premise (Dai et al., ICLR 2025): submodules (decoder layer, attention
  block, MLP block) are closer to linear in the weights than the whole model.
- `disentanglement`: weight-disentanglement error between pairs of tasks (Ortiz-Jimenez et al.,
  2023; Jin et al., ICLR 2025: fine-tuning attention only disentangles better).
- `search`: grid search of a merge method's scalar parameter (task arithmetic's lambda over
  {0, 0.05, ..., 1}) on a held-out part of each task's *train* data, never its test split.
- `slta_report`: SLTA's solved per-layer coefficients next to the best global lambda.

Shared pieces: `space` (theta_0 + sum_t a_t tau_t as parameters for `functional_call`),
`data` (answer-masked token batches of prompt/response JSONL), `splits` (the test-data guard).
"""
