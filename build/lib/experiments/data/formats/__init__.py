"""Readers of the standard on-disk dataset formats, one module per format.

Each module states its expected layout (``LAYOUT``) and where to get the data
(``SOURCE``, or ``SOURCES`` per name in imagefolder); a missing or malformed copy raises a
one-paragraph ``FamBenchError`` that names both. Nothing is ever downloaded.
"""
