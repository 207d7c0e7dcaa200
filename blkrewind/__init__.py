"""blkrewind: continuous data protection for Linux block devices, built on eBPF."""
__version__ = "0.1.0"
