"""Triton kernels, installed as the subpackage ``pypeft_fast.kernels`` (see kernels/README.md)."""
