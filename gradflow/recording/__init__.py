"""Attach to unmodified torch models and record the total dL/ds_t at every timestep.

Recording adapters, in the order the registry tries them (:mod:`.adapters`): whole-sequence modules
of every cell kind (``fused``: nn.RNN/LSTM/GRU and gradflow's own layers), registered user cells
(``custom``) and the kinds' step modules ``nn.*Cell`` (``cell``); ``record()`` owns every hook and
handle (``recorder``).
"""

from . import adapters
from .cells import KIND_CELLS, USER_CELLS, CellSpec, register_cell, unregister_cell
from .fused import SEQUENCES
from .recorder import Recorder, find_recurrent, record

for _a in (SEQUENCES, USER_CELLS, KIND_CELLS):
    if _a not in adapters.adapters():
        adapters.register_adapter(_a)

__all__ = ["record", "Recorder", "register_cell", "unregister_cell", "find_recurrent"]
