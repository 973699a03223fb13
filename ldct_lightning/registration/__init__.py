"""Cross-study LDCT <-> NDCT registration (SimpleITK), its cache and quality measures."""

from ldct_lightning.registration.cache import CachedRegistration, RegistrationCache, registration_key
from ldct_lightning.registration.geometry import Correspondence, VolumeGeometry
from ldct_lightning.registration.register import (
    RegistrationConfig,
    RegistrationError,
    RegistrationResult,
    register_study,
    z_offset_from_profiles,
)

__all__ = [
    "CachedRegistration",
    "Correspondence",
    "RegistrationCache",
    "RegistrationConfig",
    "RegistrationError",
    "RegistrationResult",
    "VolumeGeometry",
    "register_study",
    "registration_key",
    "z_offset_from_profiles",
]
