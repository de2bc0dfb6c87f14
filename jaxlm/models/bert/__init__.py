"""BERT: encoder-only, bidirectional attention, trained by masked LM."""
from jaxlm.models.bert.config import BertConfig
from jaxlm.models.config import Family

FAMILY = Family("bert", BertConfig, "jaxlm.models.bert.model:Bert")
