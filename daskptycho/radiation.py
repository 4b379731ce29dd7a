"""Wavelengths, the electron interaction constant and the Fresnel number (SI units).

The beam's physical constants, below :mod:`daskptycho.io` and :mod:`daskptycho.physics`
in the package layers: pure functions of NumPy and SciPy only, importing nothing else
of daskptycho. :mod:`daskptycho.physics` re-exports the wavelengths and the
interaction constant.
"""

from __future__ import annotations

import numpy as np
from scipy import constants as C

__all__ = ["electron_wavelength", "interaction_constant", "xray_wavelength", "wavelength", "fresnel_number"]


def electron_wavelength(energy_eV: float) -> float:
    """Relativistic de Broglie wavelength of an electron.

    Parameters
    ----------
    energy_eV : float
        Kinetic energy (accelerating voltage times e), in eV.

    Returns
    -------
    float
        Wavelength in metres (2.508e-12 m at 200 keV).
    """
    E = energy_eV * C.e
    return C.h / np.sqrt(2 * C.m_e * E * (1 + E / (2 * C.m_e * C.c**2)))


def interaction_constant(energy_eV: float) -> float:
    """Electron interaction constant sigma, in rad / (V m).

    The phase a fast electron picks up crossing a projected potential ``v`` (V m) is
    ``sigma * v``. Relativistic form: ``sigma = 2 pi / (lambda V) (m c^2 + eV) /
    (2 m c^2 + eV)`` (Kirkland, *Advanced Computing in Electron Microscopy*, eq. 5.6).
    """
    lam = electron_wavelength(energy_eV)
    mc2 = C.m_e * C.c**2 / C.e  # rest energy in eV
    return 2 * np.pi / (lam * energy_eV) * (mc2 + energy_eV) / (2 * mc2 + energy_eV)


def xray_wavelength(energy_eV: float) -> float:
    """Photon wavelength ``h c / E`` in metres (1.2398e-10 m at 10 keV)."""
    return C.h * C.c / (energy_eV * C.e)


def wavelength(radiation: str, energy_eV: float) -> float:
    """Wavelength in metres for ``radiation`` ("electron" or "xray")."""
    if radiation == "electron":
        return electron_wavelength(energy_eV)
    if radiation == "xray":
        return xray_wavelength(energy_eV)
    raise ValueError(f"radiation must be 'electron' or 'xray', got {radiation!r}")


def fresnel_number(field_m: float, wavelength_m: float, distance_m: float) -> float:
    """Fresnel number ``a**2 / (lambda z)`` of a field of width ``a`` seen at distance ``z``.

    Parameters
    ----------
    field_m : float
        Width of the illuminated field in the sample plane, metres.
    wavelength_m, distance_m : float
        Wavelength and (effective) sample-detector distance, metres.

    Returns
    -------
    float
        Dimensionless: >> 1 means near-field (Fresnel) diffraction, << 1 far field.
    """
    return float(field_m) ** 2 / (float(wavelength_m) * float(distance_m))
