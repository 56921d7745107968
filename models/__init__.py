from models.backbones import build_backbone
from models.head import build_head
from models.loading import load_backbone
from models.presets import resolve_weights
from models.simreg import SimReg
from models.student import load_student

__all__ = ['build_backbone', 'build_head', 'load_backbone', 'load_student', 'resolve_weights', 'SimReg']
