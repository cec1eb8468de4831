"""ICKD: inter-channel correlation distillation (Liu et al. ICCV 2021, "Exploring Inter-Channel
Correlation for Diversity-Preserved Knowledge Distillation", authors' code ADLab-AutoDrive/ICKD).
The student's last stage output, through a 1x1 conv + BN connector to the teacher's channels, must
have the teacher's inter-channel correlation: the C x C Gram matrix of the channel maps."""
from dataclasses import dataclass

from kdexp.errors import ConfigError
from kdexp.losses import ickd_loss
from kdexp.methods.base import Requirements, register_method
from kdexp.methods.feature import FeatureConfig, FeatureMethod
from kdexp.models.connectors import Connector
from kdexp.models.taps import feature_kind


@dataclass
class ICKDConfig(FeatureConfig):
    name: str = "ickd"
    beta: float = 2.5  # the authors' CIFAR-100 script (-b 2.5, with -r 1 -a 0)


@register_method("ickd", config=ICKDConfig)
class ICKD(FeatureMethod):
    """Liu et al. ICCV 2021: the teacher's inter-channel correlations at the last stage (Gram, L2)

    ICKD (Liu et al. ICCV 2021, arXiv 2202.03680): at the last stage, the student's map goes
    through a connector (kdexp's Connector: resize to the teacher's H x W, 1x1 conv + BN; always
    present, as the authors' `Embed`, even when the channels match); term = beta * ickd_loss:
    the squared distance of the row-normalized C x C Gram matrices of the whole map (the
    classification form; the paper's grid-level variant for segmentation, the map cut into
    patches with one Gram each, is not implemented), summed and divided by C * B."""
    requires = Requirements(features="maps")
    pick = "last"
    term = "ickd"

    def build(self, s_shapes, t_shapes):
        self.embed = None
        if feature_kind(s_shapes[0]) != "map" or feature_kind(t_shapes[0]) != "map":
            return  # not maps: the run plan rejects these layers and names the options that fit
        self.embed = Connector(s_shapes[0], t_shapes[0])

    def feature_loss(self, s, t, batch):
        if self.embed is None:
            raise ConfigError("method=ickd compares spatial feature maps (C,H,W with H*W > 1); the tapped layers "
                              "give vectors: set method.student_layers / method.teacher_layers to conv stages")
        return ickd_loss(self.embed(s[0]), t[0])
