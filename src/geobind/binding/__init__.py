"""Training: binding stages (an encoder bound to a frozen anchor) and the loop running them."""

__all__: list[str] = []
