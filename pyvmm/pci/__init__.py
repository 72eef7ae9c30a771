"""PCI for guests: configuration space access, the host bridge, and BAR placement.

``host`` holds the bus: configuration mechanism #1 (ports 0xCF8/0xCFC) and ECAM, both
reaching the same functions; ``resources`` places BARs as firmware would; ``config`` has the
register layout every part shares. Devices plug in as ``PciFunction``s (see config.py).
"""
