"""T5 (v1.1; the original too): encoder-decoder, relative position bias, gated-GELU (or ReLU),
trained by span corruption."""
from jaxlm.models.config import Family
from jaxlm.models.t5.config import T5Config

FAMILY = Family("t5", T5Config, "jaxlm.models.t5.model:T5")
