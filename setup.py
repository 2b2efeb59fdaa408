"""Build script for pypeft_fast.

Build switches (environment variables):

| variable                         | effect                                                          |
|----------------------------------|-----------------------------------------------------------------|
| PYPEFT_FAST_PURE_PYTHON=1        | skip every native extension (pure-PyTorch + Triton only)        |
| PYPEFT_FAST_SKIP_CUDA=1          | build only the C++ CPU kernels, even with a CUDA torch and nvcc |
| PYPEFT_FAST_CUDA_ARCHS="80;90a"  | CUDA architectures (default 80;90a; else TORCH_CUDA_ARCH_LIST)  |
| PYPEFT_FAST_DEBUG=1              | -O0 -g instead of -O3 (host and device)                         |
| PYPEFT_FAST_PTXAS_VERBOSE=0      | drop -Xptxas -v (registers/spills per kernel; on by default)    |
| MAX_JOBS=N                       | parallel compile jobs (default: from cores and free memory)     |
| CUDA_HOME=/usr/local/cuda-13.0   | the CUDA toolkit root (not the directory of an nvcc wrapper)    |

What gets built, into the one module ``pypeft_fast._C`` (ops under ``torch.ops.pypeft_fast``):

* always (unless pure Python): the C++ CPU kernels in ``csrc/`` (CppExtension, ``-O3``,
  ``-fopenmp`` when torch uses OpenMP);
* additionally the CUDA kernels (``csrc/**/*.cu``, CUDAExtension) when torch is a CUDA build
  and nvcc is found; otherwise it prints why and builds the CPU part.

The Triton kernels in ``kernels/`` are installed as the subpackage ``pypeft_fast.kernels``
(never as a top-level ``kernels`` module, which would shadow Hugging Face's ``kernels``).

Install with ``pip install --no-build-isolation .`` (or ``-e .``, or
``python setup.py build_ext --inplace``) so that the build uses the torch already installed in
the environment: the extension must be compiled against the torch it runs with.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

# Every subpackage of pypeft_fast/ (families, inject, ...), plus kernels/ as pypeft_fast.kernels.
PACKAGES = find_packages(include=["pypeft_fast", "pypeft_fast.*"]) + ["pypeft_fast.kernels"]
PACKAGE_DIR = {"pypeft_fast.kernels": "kernels"}
ROOT = os.path.dirname(os.path.abspath(__file__))
ABI_VERSION = 9  # bump with any schema or registration change; pypeft_fast/_ops.py checks it


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _say(msg: str) -> None:
    print(f"pypeft_fast setup: {msg}", file=sys.stderr)


def _locate_cuda_home() -> None:
    """torch guesses CUDA_HOME as dirname(dirname(which nvcc)), wrong when nvcc is a wrapper
    script (/usr/local/bin/nvcc). Point it at a directory that holds include/cuda_runtime.h."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(root, "bin", "nvcc")
        ):
            os.environ["CUDA_HOME"] = root
            return


def _cuda_archs() -> list[str]:
    """``["80", "90a"]`` from PYPEFT_FAST_CUDA_ARCHS or TORCH_CUDA_ARCH_LIST."""
    spec = os.environ.get("PYPEFT_FAST_CUDA_ARCHS")
    if not spec and os.environ.get("TORCH_CUDA_ARCH_LIST"):
        spec = os.environ["TORCH_CUDA_ARCH_LIST"].replace("+PTX", "")
    archs = [a.replace(".", "") for a in (spec or "80;90a").replace(",", ";").split(";") if a.strip()]
    return [a.strip() for a in archs]


def _max_jobs() -> None:
    if "MAX_JOBS" in os.environ:
        return
    jobs = os.cpu_count() or 1
    try:  # about 1.5 GiB per nvcc/cc1plus job at most
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        jobs = max(1, min(jobs, int(avail // (1536 << 20))))
    except (ValueError, OSError, AttributeError):
        pass
    os.environ["MAX_JOBS"] = str(jobs)


def _extensions():
    if _flag("PYPEFT_FAST_PURE_PYTHON"):
        _say("PYPEFT_FAST_PURE_PYTHON=1: skipping the native extension (torch/Triton paths only)")
        return [], {}
    _locate_cuda_home()
    _max_jobs()
    import torch
    from torch.utils import cpp_extension

    debug = _flag("PYPEFT_FAST_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    torch_version = torch.__version__
    cxx = opt + ["-ffp-contract=fast", "-Wno-psabi", "-fvisibility=hidden"]
    if torch.backends.openmp.is_available():
        cxx.append("-fopenmp")
    sources = sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
    )
    cu_sources = sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
    )
    macros = [("PPF_TORCH_VERSION", f'"{torch_version}"'), ("PPF_ABI_VERSION", str(ABI_VERSION))]
    link = ["-fopenmp"] if "-fopenmp" in cxx else []

    why_no_cuda = None
    if _flag("PYPEFT_FAST_SKIP_CUDA"):
        why_no_cuda = "PYPEFT_FAST_SKIP_CUDA=1"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch_version} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None or not os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    ):
        why_no_cuda = "nvcc was not found (set CUDA_HOME to the CUDA toolkit root)"

    if why_no_cuda is not None:
        _say(f"building the C++ CPU kernels only: {why_no_cuda}")
        ext = cpp_extension.CppExtension(
            "pypeft_fast._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=link,
        )
        return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}

    archs = _cuda_archs()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo", *gencode]
    if os.environ.get("PYPEFT_FAST_PTXAS_VERBOSE", "1") != "0":
        nvcc += ["-Xptxas", "-v"]
    macros += [
        ("PPF_WITH_CUDA", None),
        ("PPF_CUDA_VERSION", f'"{torch.version.cuda}"'),
        ("PPF_CUDA_ARCHS", '"' + ";".join(archs) + '"'),
    ]
    _say(f"building the C++ CPU and CUDA kernels (CUDA {torch.version.cuda}, "
         f"CUDA_HOME={cpp_extension.CUDA_HOME}, archs {';'.join(archs)})")
    # TORCH_CUDA_ARCH_LIST would make torch add its own -gencode flags; ours are explicit.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(a[0] + "." + a[1:] for a in archs)
    ext = cpp_extension.CUDAExtension(
        "pypeft_fast._C", sources + cu_sources, define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _extensions()

setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=EXT_MODULES, cmdclass=CMDCLASS)
