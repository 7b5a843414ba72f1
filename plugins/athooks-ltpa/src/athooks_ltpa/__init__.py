"""Learn To Pay Attention (Jetley et al., ICLR 2018) for any model, as an athooks plugin.

``attach(model, ...)`` adds the paper's trainable attention module to any CNN through forward
hooks on layers named by athooks patterns; the ``ltpa`` mapping makes a trained head's attention
available to athooks (attention transfer with a Distiller, visualisation); ``segment`` turns an
attention map into a mask at image resolution (weakly supervised segmentation).

Plugins run code: athooks imports this package through its entry point (group ``athooks``)
the first time a mapping name is looked up. Install only plugins you trust.
"""

from athooks_ltpa.head import LTPAHead, LTPALayer, attach
from athooks_ltpa.mapping import LTPAMapping
from athooks_ltpa.segmentation import otsu_threshold, segment

__all__ = ["LTPAHead", "LTPALayer", "LTPAMapping", "attach", "otsu_threshold", "segment"]
__version__ = "0.1.0"
