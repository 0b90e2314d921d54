"""Builds torchrpc._C from csrc/ with torch's cpp_extension (ninja).

DEBUG=1 builds with -O0 -g; the default is -O2 -g0 so that a fresh build on a
small machine stays quick.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


HERE = os.path.dirname(os.path.abspath(__file__))


class InTreeBuildExtension(BuildExtension):
    """Keeps object files in build/temp, inside the tree. pip builds an
    editable install in a new temporary folder each time, so without this
    every `make build` recompiles everything, and ccache (which hashes paths
    relative to the tree, see the Makefile) never matches a fresh clone."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(HERE, "build", "temp")


def get_extensions():
    debug = os.environ.get("DEBUG", "0") == "1"
    flags = ["-O0", "-g"] if debug else ["-O2", "-g0"]
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    return [
        CppExtension(
            "torchrpc._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            # OpenSSL's libcrypto: HMAC-SHA256 and nonces for the peer handshake.
            libraries=["crypto"],
            extra_compile_args={"cxx": flags + ["-std=c++17", "-Wall", "-Wno-unused-parameter"]},
        )
    ]


setup(
    name="torchrpc",
    version="0.1.0",
    description="TorchScript-first RPC for PyTorch",
    packages=find_packages(include=["torchrpc", "torchrpc.*", "scripted_ops", "scripted_ops.*"]),
    ext_modules=get_extensions(),
    cmdclass={"build_ext": InTreeBuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    # The extension is built against the torch found at build time
    # (--no-build-isolation), so any torch the build accepted will do here;
    # numpy is what Tensor.numpy() needs for pickled payloads and archives.
    install_requires=["torch>=2.13", "numpy"],
    extras_require={
        # torchrpc.testing: hypothesis strategies for remote functions.
        "testing": ["hypothesis"],
        # make test: the suite, and the Prometheus parser it checks metrics with.
        "test": ["pytest", "hypothesis", "prometheus_client"],
        # make bench / fuzz / soak / torch-suite: progress bars, plots, and
        # expecttest, which torch's own RPC test suite imports.
        "bench": ["tqdm", "matplotlib", "expecttest"],
    },
)
