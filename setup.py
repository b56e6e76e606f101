"""Install clipforget_fast: the library, its Triton kernels (folder kernels/, installed as
clipforget_fast.kernels) and the proving-ground model files. Triton and the C++ CPU kernel are
optional at run time: without them the pure-torch reference runs."""
import os
import warnings

from setuptools import find_packages, setup

# Optional C++ CPU kernel for the multi-layer apply (csrc/), built when CLIPFORGET_BUILD_CPP=1 (the
# Makefile sets it). A failed build only warns: the torch path then runs.
ext_modules, cmdclass = [], {}
if os.environ.get("CLIPFORGET_BUILD_CPP") == "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        class _OptionalBuild(BuildExtension):
            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as err:  # a missing compiler or OpenMP only warns
                    warnings.warn(f"C++ CPU kernel not built ({err}); the torch path is used")

        # -march=native: the kernel is built on the machine that runs it; drop it for wheels.
        ext_modules = [CppExtension("clipforget_fast._lowrank_cpu", ["csrc/lowrank_update.cpp"],
                                    extra_compile_args=["-O3", "-march=native", "-fopenmp"],
                                    extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": _OptionalBuild}
    except ImportError:
        warnings.warn("torch is not importable at build time; the C++ CPU kernel is not built")

version = {}
exec(open("clipforget_fast/_version.py").read(), version)  # single source of the version string

setup(
    name="clipforget_fast",
    version=version["__version__"],
    description="Training-free, data-free class and domain unlearning for CLIP models",
    packages=find_packages(include=["clipforget_fast", "clipforget_fast.*"]) + ["clipforget_fast.kernels"],
    package_dir={"clipforget_fast.kernels": "kernels"},
    package_data={"clipforget_fast.proving_ground": ["*.json", "*.md", "weights/*.safetensors"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "open_clip_torch>=2.24", "numpy", "safetensors", "pillow", "tqdm"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "hf": ["transformers>=4.40"]},
    entry_points={"console_scripts": ["clipforget=clipforget_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
