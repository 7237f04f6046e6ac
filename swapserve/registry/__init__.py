"""The registry: deployed functions persisted in SQLite plus one bundle directory per function."""

from swapserve.registry.registry import DeployTicket, FunctionRecord, Registry, RegistryError

__all__ = ["DeployTicket", "FunctionRecord", "Registry", "RegistryError"]
