"""Test configuration. TRITON_INTERPRET must be set before anything imports triton
(transformers and peft do), so it is set here, first: the Triton kernels run on CPU tensors
under the interpreter in CI, where no GPU exists."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
