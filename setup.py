"""Build script for pypeft_fast.

Build switches (environment variables):

| variable                     | effect                                                        |
|------------------------------|---------------------------------------------------------------|
| PYPEFT_FAST_PURE_PYTHON=1    | skip every native extension (pure-PyTorch + Triton only)      |

The Triton kernels in ``kernels/`` are installed as the subpackage ``pypeft_fast.kernels``
(never as a top-level ``kernels`` module, which would shadow Hugging Face's ``kernels``).

Install with ``pip install --no-build-isolation .`` so that the build uses the torch already
installed in the environment.
"""
from setuptools import setup

PACKAGES = ["pypeft_fast", "pypeft_fast.families", "pypeft_fast.kernels"]
PACKAGE_DIR = {"pypeft_fast.kernels": "kernels"}

setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
