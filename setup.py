"""Install clipforget_fast: the library, its Triton kernels (folder kernels/, installed as
clipforget_fast.kernels) and the proving-ground model files. Triton and the C++ CPU kernel are
optional at run time: without them the pure-torch reference runs."""
from setuptools import setup

version = {}
exec(open("clipforget_fast/_version.py").read(), version)  # single source of the version string

setup(
    name="clipforget_fast",
    version=version["__version__"],
    description="Training-free, data-free class and domain unlearning for CLIP models",
    packages=["clipforget_fast", "clipforget_fast.proving_ground", "clipforget_fast.kernels"],
    package_dir={"clipforget_fast.kernels": "kernels"},
    package_data={"clipforget_fast.proving_ground": ["*.json", "*.md", "weights/*.safetensors"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "open_clip_torch>=2.24", "numpy", "safetensors", "pillow", "tqdm"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
)
