"""merge-harness core: config, registry, checkpoint IO, merge engine, evaluation, store, runner, CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("merge-harness")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
