"""The registry of contracts: adding one is a module beside this file and a line below."""

from worker.contracts.base import Contract
from worker.contracts.customer import CUSTOMER

CONTRACTS: dict[str, Contract] = {contract.name: contract for contract in (CUSTOMER,)}


def get_contract(name: str) -> Contract:
    return CONTRACTS[name]


__all__ = ["CONTRACTS", "Contract", "get_contract"]
