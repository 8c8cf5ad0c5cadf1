"""kernels/ and parallel/ install as lctrain.kernels and lctrain.parallel, never as top-level packages."""
from setuptools import find_packages, setup

MAPPED = {"lctrain.kernels": "kernels", "lctrain.parallel": "parallel"}


def packages_under(name: str, folder: str) -> list[str]:
    return [name] + [f"{name}.{sub}" for sub in find_packages(folder)]


packages = find_packages(include=["lctrain", "lctrain.*"])
for name, folder in MAPPED.items():
    packages += packages_under(name, folder)

setup(packages=packages, package_dir=MAPPED, package_data={"lctrain": ["hf/templates/*.py"]})
