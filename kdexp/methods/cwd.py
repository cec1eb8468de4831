"""CWD: channel-wise distillation (Shu et al. ICCV 2021, "Channel-wise Knowledge Distillation for
Dense Prediction", authors' code irfanICMLL/TorchDistiller, mmrazor's ChannelWiseDivergence).
Every channel of a feature map is turned into a distribution over its spatial positions; the
student's must match the teacher's (KL). The paper targets dense prediction (segmentation and
detection, on the logit maps or FPN features); here it runs on the last stage of a classifier."""
from dataclasses import dataclass

from kdexp.errors import ConfigError
from kdexp.losses import cwd_loss
from kdexp.methods.base import Requirements, register_method
from kdexp.methods.feature import FeatureConfig, FeatureMethod
from kdexp.models.connectors import Connector
from kdexp.models.taps import feature_kind


@dataclass
class CWDConfig(FeatureConfig):
    name: str = "cwd"
    # The authors' Cityscapes run (`exp_cwd.sh channel kl 3 4`: weight 3, temperature 4, on the logit
    # maps); mmrazor's PSPNet config uses tau=1, loss_weight=5. No classification setting is published.
    beta: float = 3.0
    tau: float = 4.0  # temperature of the per-channel spatial softmax (method.temperature stays KD's)


@register_method("cwd", config=CWDConfig)
class CWD(FeatureMethod):
    """Shu et al. ICCV 2021: the teacher's last-stage maps softened per channel over positions (KL)

    CWD (Shu et al. ICCV 2021, arXiv 2011.13256): at the last stage, the student's map (through
    kdexp's Connector, resize + 1x1 conv + BN, when its shape differs from the teacher's; mmrazor
    aligns channels with a plain 1x1 conv) and the teacher's are softened per channel over H*W
    at temperature tau; term = beta * tau^2 * sum over channels of KL(teacher || student) / (B*C)."""
    requires = Requirements(features="maps")
    pick = "last"
    term = "cwd"

    def build(self, s_shapes, t_shapes):
        if self.cfg.tau <= 0:
            raise ConfigError(f"method.tau={self.cfg.tau} must be > 0")
        self.align = None
        if feature_kind(s_shapes[0]) != "map" or feature_kind(t_shapes[0]) != "map":
            return  # not maps: the run plan rejects these layers and names the options that fit
        self.align = Connector(s_shapes[0], t_shapes[0], identity_if_equal=True)

    def feature_loss(self, s, t, batch):
        if self.align is None:
            raise ConfigError("method=cwd compares spatial feature maps (C,H,W with H*W > 1); the tapped layers "
                              "give vectors: set method.student_layers / method.teacher_layers to conv stages")
        return cwd_loss(self.align(s[0]), t[0], self.cfg.tau)
