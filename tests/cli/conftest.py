"""The MoE commands' tests use the MoE package's fixtures: two real skill LoRAs and their data."""

from tests.moe.conftest import adapter_dirs, data_file

__all__ = ["adapter_dirs", "data_file"]
