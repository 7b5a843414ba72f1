"""athooks-zoo: the distillation methods attention transfer is compared against, as athooks losses."""

__version__ = "0.1.0"
