"""pyproject.toml holds the metadata; this only ships the top-level ``configs/`` inside the package
as ``xtuner_vitask.configs`` (XTuner's convention: `xtuner list-cfg` / `copy-cfg` over configs that
live in the installed package), while the checkout keeps ``configs/`` where users expect it."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["xtuner_vitask*"])
    + ["xtuner_vitask.configs", "xtuner_vitask.configs.vitask", "xtuner_vitask.configs.tsm"],
    package_dir={"xtuner_vitask.configs": "configs"},
    package_data={"xtuner_vitask": ["**/*.py.tmpl", "**/*.json"], "xtuner_vitask.configs": ["deepspeed/*.json"]},
)
