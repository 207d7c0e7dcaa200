"""restore (not written yet)."""
from blkrewind.errors import UserError


def add_arguments(p):
    pass


def run(args):
    raise UserError("'restore' is not implemented yet")
