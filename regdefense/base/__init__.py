"""Foundation: errors, the run configuration, the registry helper, safe files and checkpoints, the process's runtime.

Every other layer may import from here; nothing here imports from another layer (the import-linter contract
in ``pyproject.toml`` keeps it so).
"""
