"""Where rise_edge.methods went: rise_edge.train.methods; this old path still imports, with a warning.

Plugins written before the layout by stage import `register_method` from here; every public name of
rise_edge.train.methods is re-exported.
"""

import warnings

from rise_edge.train.methods import *  # noqa: F401,F403  (the module's public names, as before)
from rise_edge.train.methods import register_method  # noqa: F401

warnings.warn("rise_edge.methods moved to rise_edge.train.methods; import register_method from there",
              DeprecationWarning, stacklevel=2)
