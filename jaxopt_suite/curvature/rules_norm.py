"""The LayerNorm and Embed rules' statistic functions under their former module name
(:mod:`jaxopt_suite.curvature.rules.layernorm`, :mod:`jaxopt_suite.curvature.rules.embed`)."""

from jaxopt_suite.curvature.rules.embed import embed
from jaxopt_suite.curvature.rules.layernorm import layernorm, layernorm_gradients

__all__ = ["embed", "layernorm", "layernorm_gradients"]
