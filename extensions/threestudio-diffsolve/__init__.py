"""threestudio extension "threestudio-diffsolve": registers the `diffsolve-guidance` guidance on import.

Install: copy (or symlink) this folder into threestudio's `custom/` folder, with diffsolve installed in the
same environment; threestudio imports every extension under `custom/` at start-up. Then use
`system.guidance_type: "diffsolve-guidance"` (see configs/*.yaml here and docs/threestudio.md).
"""
from .guidance import diffsolve_guidance  # noqa: F401  (registers "diffsolve-guidance")
