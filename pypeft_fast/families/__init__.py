"""The delta families. Importing this package registers each of them in the registry: first
the math and kernels (``<name>.py``), then everything else the family declares once
(``<name>_decl.py``: ``registry.declare``; pypeft_fast/declaration.py). The order of the
declarations is the order of the benchmark cases."""
from . import hadamard, kronecker, lowrank, phm, sparse  # noqa: F401  (registration side effects)
from . import lowrank_decl, kronecker_decl, phm_decl, hadamard_decl, sparse_decl  # noqa: F401,E402
