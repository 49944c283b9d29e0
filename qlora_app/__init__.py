"""qlora-app: QLoRA fine-tuning, merging and serving of 7-8B causal LMs on one GPU."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qlora-app")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
