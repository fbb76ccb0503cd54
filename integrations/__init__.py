"""Adapters that import third-party stacks (diffusers, k-diffusion, threestudio-style guidance).

Installed as `diffsolve.integrations`; the core package never imports this one.
"""
