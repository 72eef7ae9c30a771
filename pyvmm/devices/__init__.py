"""Emulated devices, one per module, as in kvmtool: each claims its ranges on a bus."""
