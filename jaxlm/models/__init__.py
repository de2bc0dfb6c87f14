"""Model families, one folder each (see models/config.py for what a family provides).

A family's model exposes the model protocol (jaxlm/models/protocol.py): `embed`, a layer
`stack()` and `head`. Schedulers of the stack (plain scan, pipeline, decoding) live outside and
are never imported from here. Importing this package imports no JAX.
"""
