"""Where rise_edge.teacher went: rise_edge.train.teacher; this old path still imports, with a warning.

Plugins written before the layout by stage import `register_teacher` from here; every public name of
rise_edge.train.teacher is re-exported.
"""

import warnings

from rise_edge.train.teacher import *  # noqa: F401,F403  (the module's public names, as before)
from rise_edge.train.teacher import register_teacher  # noqa: F401

warnings.warn("rise_edge.teacher moved to rise_edge.train.teacher; import register_teacher from there",
              DeprecationWarning, stacklevel=2)
