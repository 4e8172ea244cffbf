"""Drop-in replacements for other libraries' loss classes: ``compat.liger`` mirrors Liger-Kernel's chunked losses."""
