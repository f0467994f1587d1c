"""gradflow.analysis: pure functions on traces and Jacobians (never imports gradflow.recording).

Per-step Jacobians (:func:`jacobians`, closed form for built-in cells, torch.func for custom ones;
:func:`linearize_trace` keeps them factored for matrix-free products), their spectra
(:func:`singular_values`, :func:`top_singular_values`, :func:`eigenvalue_moduli`), products over
distance and the Lyapunov spectrum in the log domain (:func:`product_spectrum`,
:func:`lyapunov_spectrum`), gradient against distance (:func:`gradient_matrix`,
:func:`distance_profile`), gate statistics, and the tidy tables of ``gradflow.tables`` with verdicts.
"""

from . import adjoint, cells, config, distance, frames, gates, jacobian, linear, pipeline, plan, products, spectra
from . import streaming
from .adjoint import *  # noqa: F401,F403
from .cells import *  # noqa: F401,F403
from .config import *  # noqa: F401,F403
from .distance import *  # noqa: F401,F403
from .frames import *  # noqa: F401,F403
from .gates import *  # noqa: F401,F403
from .jacobian import *  # noqa: F401,F403
from .linear import *  # noqa: F401,F403
from .pipeline import *  # noqa: F401,F403
from .plan import *  # noqa: F401,F403
from .products import *  # noqa: F401,F403
from .spectra import *  # noqa: F401,F403
from .streaming import *  # noqa: F401,F403

__all__: list[str] = [
    name
    for mod in (jacobian, linear, cells, spectra, products, adjoint, distance, gates, frames, config, plan, streaming,
                pipeline)
    for name in mod.__all__
]
