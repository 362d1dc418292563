from metalab.models.backbones import MLP, Conv4, build_backbone

__all__ = ["Conv4", "MLP", "build_backbone"]
