"""Flover temporal fusion: a decode scheduler that fuses every live request into one step per iteration."""

from services.fusion.request import NO_TOKEN, DecodeRequest
from services.fusion.scheduler import POLICIES, FusionScheduler

__all__ = ["NO_TOKEN", "POLICIES", "DecodeRequest", "FusionScheduler"]
