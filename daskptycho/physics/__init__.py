"""Pure physics of ptychography: probes, propagation, multislice, cost (and the
wavelengths of :mod:`daskptycho.radiation`, re-exported).

Every function here works on NumPy or CuPy arrays alike (the array module is looked
up from the inputs) and has no side effects.
"""

from ..radiation import electron_wavelength, interaction_constant, wavelength, xray_wavelength
from .cost import amplitude_cost, cost_and_far_field_gradient, poisson_cost
from .multislice import Windows, backward, far_field_intensity, forward, gradients, window_index, windows
from .probe import aperture_probe, electron_probe, orthogonalize_modes, probe_modes, xray_probe
from .propagation import fresnel_kernel, propagate

__all__ = [
    "electron_wavelength", "interaction_constant", "xray_wavelength", "wavelength",
    "amplitude_cost", "poisson_cost", "cost_and_far_field_gradient",
    "forward", "backward", "gradients", "window_index", "windows", "Windows", "far_field_intensity",
    "aperture_probe", "electron_probe", "xray_probe", "probe_modes", "orthogonalize_modes",
    "fresnel_kernel", "propagate",
]
