"""pdserve.common: the engine core and everything shared by the services."""
