"""Attach to unmodified torch models and record the total dL/ds_t at every timestep.

One adapter per module kind: fused ``nn.RNN/LSTM/GRU`` (``fused``), ``nn.*Cell`` and registered user
cells (``cells``); ``record()`` owns every hook and handle (``recorder``).
"""

from .cells import CellSpec, register_cell, unregister_cell
from .recorder import Recorder, find_recurrent, record

__all__ = ["record", "Recorder", "register_cell", "unregister_cell", "find_recurrent"]
