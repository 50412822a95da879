"""Builds minilm and its extension minilm._C: `pip install --no-build-isolation -e .`

The sources and flags live in minilm/_build.py so that the JIT fallback compiles exactly the same thing.
"""
import importlib.util
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

os.chdir(os.path.dirname(os.path.abspath(__file__)))  # the paths below are relative to this file
_spec = importlib.util.spec_from_file_location("minilm_build", os.path.join("minilm", "_build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

with_cuda = build.want_cuda()
rel = lambda paths: [os.path.relpath(p) for p in paths]  # setuptools wants paths relative to setup.py
if with_cuda:
    ext = CUDAExtension("minilm._C", rel(build.cpu_sources() + build.cuda_sources()),
                        depends=rel(build.headers(True)),
                        extra_compile_args={"cxx": build.cxx_flags(True), "nvcc": build.nvcc_flags()},
                        extra_link_args=build.openmp_flags())
else:
    ext = CppExtension("minilm._C", rel(build.cpu_sources()), depends=rel(build.headers(False)),
                       extra_compile_args={"cxx": build.cxx_flags(False)}, extra_link_args=build.openmp_flags())

setup(
    name="minilm",
    version="0.1.0",
    description="GPT-1 and ELMo from scratch, with fused causal-attention and char-CNN kernels",
    packages=find_packages(include=["minilm", "minilm.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest", "transformers", "h5py", "safetensors", "matplotlib"],
        "plot": ["matplotlib"],
        "elmo": ["h5py"],
    },
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
