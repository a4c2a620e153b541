"""Imports limited to the GPU machine's image and the bundle: `make gpu-check` rehearsed.

Python runs this module at start-up when its folder is on PYTHONPATH, in the
rehearsal's processes and in every process they start. It puts a finder first
on `sys.meta_path` that refuses, with the ModuleNotFoundError the GPU machine
would raise, any top-level module that this environment's site-packages would
give but whose distribution is neither in the image's list
(PAGEDSERVE_GPU_IMAGE: benchmarks/gpu-image.txt) nor installed from the bundle
(PAGEDSERVE_GPU_SITE: the folder `make gpu-site` installed into). The standard
library, the bundle's folder and the tree itself are not site-packages.

What an image package imports for itself is let through unless pagedserve
requires that distribution (or one of its extras does): this venv's
transformers or huggingface_hub is newer than the image's and imports
packages that the image's own versions do without. Their imports in turn
count as the image's. Nothing pagedserve requires is ever let through that
way, so a bundle without pydantic fails as it would on the GPU.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import re
import site
import sys
from pathlib import Path


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def listed(path: Path) -> set[str]:
    """The distribution names of a list file: one a line, `name==version` or `name`, # comments."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(normalize(re.split(r"[=<>!~;\[ ]", line, maxsplit=1)[0]))
    return names


def installed(site_dir: Path) -> set[str]:
    """The distributions installed in a `pip install --target` folder."""
    return {normalize(info.name.split("-", 1)[0]) for info in site_dir.glob("*.dist-info")}


def project_requirements() -> set[str]:
    """Every distribution pagedserve's metadata names, extras included."""
    try:
        requires = importlib.metadata.requires("pagedserve") or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {normalize(re.split(r"[=<>!~;\[ (]", line, maxsplit=1)[0]) for line in requires}


class GPUImageFinder(importlib.abc.MetaPathFinder):
    """Refuses top-level modules that the GPU machine would not have."""

    def __init__(self, image: set[str], bundle: set[str], site_dirs: list[str]):
        self.image, self.bundle = image, bundle
        self.site_dirs = [os.path.realpath(d) + os.sep for d in site_dirs]
        self.required = project_requirements()
        self.module_dists = {module: {normalize(d) for d in dists} for module, dists
                             in importlib.metadata.packages_distributions().items()}
        self.image_side: set[str] = set()  # modules let through for an image package
        self.refused: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if path is not None or fullname in sys.stdlib_module_names:
            return None  # submodules follow their package; the standard library is there
        spec = importlib.machinery.PathFinder.find_spec(fullname)
        if spec is None or not self._from_site_packages(spec):
            return None
        dists = self.module_dists.get(fullname, set())
        if not dists or dists & (self.image | self.bundle):
            return None  # no distribution's (a vendored copy: setuptools' jaraco), or allowed
        if self._imported_by_image() and not dists & self.required:
            self.image_side.add(fullname)
            return None
        self.refused.append(fullname)
        raise ModuleNotFoundError(
            f"No module named {fullname!r} on the GPU machine: {', '.join(sorted(dists))} "
            "is neither in its image (benchmarks/gpu-image.txt) nor in the bundle "
            "(benchmarks/gpu-bundle.txt)", name=fullname)

    def _from_site_packages(self, spec) -> bool:
        places = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
        return any(os.path.realpath(p).startswith(d) for p in places for d in self.site_dirs)

    def _imported_by_image(self) -> bool:
        """Whether the code asking for the module belongs to an image package."""
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_globals.get("__name__") or ""
            if not name.startswith("importlib") and name != __name__:
                top = name.partition(".")[0]
                return top in self.image_side or bool(self.module_dists.get(top, set())
                                                      & self.image)
            frame = frame.f_back
        return False


def install() -> None:
    image, site_dir = os.environ.get("PAGEDSERVE_GPU_IMAGE"), os.environ.get("PAGEDSERVE_GPU_SITE")
    if not image or not site_dir:
        raise RuntimeError("PAGEDSERVE_GPU_IMAGE and PAGEDSERVE_GPU_SITE must name the image's "
                           "package list and the bundle's install folder")
    site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    sys.meta_path.insert(0, GPUImageFinder(listed(Path(image)), installed(Path(site_dir)),
                                           site_dirs))


install()
