"""Distillation/transfer methods, registered by name (= the conf/method option name). The base
class, the Batch, the configs' base schema and the registry live in kdexp.methods.base; this
package imports every method file so that the registry is complete."""
from kdexp.methods.base import (METHODS, UNLABELED, Batch, Method, MethodConfig, OptimConfig, Requirements,  # noqa: F401
                                SofteningConfig,
                                Stage, get_method, list_methods, register_method, requirements)
from kdexp.methods import logit, logit_match, teacher_free, mutual, ensemble  # noqa: E402,F401  (logit-level)
from kdexp.methods import ctkd  # noqa: E402,F401  (learned temperature on top of kd/dkd)
from kdexp.methods import mlkd, nkd, wsld  # noqa: E402,F401  (logit-level variants)
from kdexp.methods import feature, relation, gradient  # noqa: E402,F401  (feature- and relation-based)
from kdexp.methods import reviewkd  # noqa: E402,F401  (knowledge review: ABF fusion + HCL)
from kdexp.methods import ofd  # noqa: E402,F401  (overhaul of feature distillation: margins + partial L2)
from kdexp.methods import srd, ickd, cwd, mgd  # noqa: E402,F401  (classifier-, channel- and mask-based feature)
from kdexp.methods import transfer, domain  # noqa: E402,F401  (transfer learning, domain adaptation)
from kdexp.methods import data_free  # noqa: E402,F401  (data-free: generated inputs only)
