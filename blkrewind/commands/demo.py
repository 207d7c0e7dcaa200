"""demo (not written yet)."""
from blkrewind.errors import UserError


def add_arguments(p):
    pass


def run(args):
    raise UserError("'demo' is not implemented yet")
