"""athooks-zoo: the methods attention transfer is compared against, as athooks losses."""

__version__ = "0.1.0"
