"""kvbench's Hydra launchers.

Hydra finds launchers only in the ``hydra_plugins`` namespace package (which therefore has no ``__init__.py``)
and imports every module here when it starts, so these modules import nothing heavy (torch, kvbench's runner)
until a sweep actually launches.
"""
