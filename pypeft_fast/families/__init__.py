"""The four delta families. Importing this package registers each of them in the registry."""
from . import hadamard, kronecker, lowrank, phm, sparse  # noqa: F401  (registration side effects)
