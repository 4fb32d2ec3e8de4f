"""Choosing hyper-parameters on held-out rows (never on test): grids, held-out splits, answer scoring
and the coefficient search.
"""
