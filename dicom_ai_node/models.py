"""The models this node has: bundled ones (model_zoo/) plus folders the site configures."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from model_zoo import registry
from model_zoo.base import Model
from model_zoo.manifest import Manifest, ManifestError, load_manifest

log = logging.getLogger(__name__)

BUNDLED = Path(registry.__file__).parent


def find_manifests(folders: list[Path]) -> tuple[dict[str, Manifest], list[str]]:
    """Every model.toml one level below each folder; returns (by name, problems)."""
    manifests: dict[str, Manifest] = {}
    problems: list[str] = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*/model.toml")):
            try:
                manifest = load_manifest(path)
            except ManifestError as error:
                problems.append(str(error))
                continue
            if manifest.name in manifests:
                problems.append(f"{path}: model name {manifest.name!r} is also used by "
                                f"{manifests[manifest.name].path}; the first one is kept")
                continue
            manifests[manifest.name] = manifest
    return manifests, problems


class ModelRegistry:
    def __init__(self, extra_folders: tuple[Path, ...] = ()):
        self.manifests, self.problems = find_manifests([BUNDLED, *extra_folders])
        for problem in self.problems:
            log.warning("model not installed: %s", problem)
        # set by the node to the admin page's "disabled models" table: a disabled model's
        # jobs fail with "not installed or is disabled" instead of running
        self.is_disabled: Callable[[str], bool] = lambda name: False

    @property
    def names(self) -> set[str]:
        return set(self.manifests)

    def manifest(self, name: str) -> Manifest | None:
        """The model's manifest; None when it is not installed or an admin disabled it."""
        if self.is_disabled(name):
            return None
        return self.manifests.get(name)

    def load(self, manifest: Manifest) -> Model:
        """Loaded once per process and reused (the zoo's registry caches instances). A model
        whose manifest says ``device = "cpu"`` stays on the CPU even on a GPU host."""
        return registry.load_model(manifest, "cpu" if manifest.device == "cpu" else None)
