"""Tuning budget (placeholder)."""


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError
