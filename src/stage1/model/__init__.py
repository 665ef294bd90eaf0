"""The network: plain nn.Modules, no Lightning inside."""

from stage1.model.bottleneck import Bottleneck, compute_latent_len
from stage1.model.decoder import TFDecoder
from stage1.model.encoder import SharedEncoder
from stage1.model.model import Stage1Model
from stage1.model.stem import TFSpecificStem

__all__ = [
    "Bottleneck",
    "SharedEncoder",
    "Stage1Model",
    "TFDecoder",
    "TFSpecificStem",
    "compute_latent_len",
]
