"""The XLA flag every test process compiles with: pytest's own (tests/conftest.py) and the jaxlm
processes tests start.

LLVM at -O1 instead of XLA's default. The suite mostly compiles tiny programs, and -O1 compiles
them faster: test_sharding and test_nn took 108 s instead of 144 s on 2 cores. Results and step
speed were the same: the README's tiny run gave eval loss 2.0521 at ~0.11 s a step either way.
-O0 compiled faster still (93 s), but ran steps 2x slower and changed the rounding."""
COMPILE = "--xla_backend_optimization_level=1"
