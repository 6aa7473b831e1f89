"""Packaging for magma_composer."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "magma_composer" / "__init__.py").read_text()).group(1)

install_requires = [
    "mosaicml==0.32.1",
    "mosaicml-streaming==0.13.0",
    "torch>=2.6,<2.7.1",
    "torchvision>=0.21,<=0.22.0",
    "timm>=1.0",
    "pyyaml>=6.0",
    "wandb>=0.16",
    "numpy<2.2",
    "pillow",
    "tqdm",
]

extras_require = {
    "dev": [
        "pytest>=8",
        "pytest-timeout",
        "ruff>=0.6",
        "moto[server]>=5",
        "boto3",
        # reference implementations of NT-Xent and VICReg that the loss tests compare against
        "lightly>=1.5",
        # experiments/magma_diagnostics.py's plots (already installed with mosaicml-streaming)
        "matplotlib",
    ],
    "bench": ["scikit-learn"],
}

setup(
    name="magma_composer",
    version=VERSION,
    description="MAGMA, uniformity and PCA masking for masked autoencoders, as MosaicML Composer algorithms.",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["magma_composer", "magma_composer.*"]),
    package_data={"magma_composer": ["**/README.md", "models/*.md", "data/*.txt"]},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
)
