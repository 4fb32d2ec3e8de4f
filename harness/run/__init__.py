"""Experiments as jobs: the experiment file, content-hash job keys, the runner and its executors
(local, Ray).
"""
