"""Federated algorithms, one module per idea.

Import from the modules themselves (``brats_fl.algorithms.personal``): FLARE's job export follows
module imports to decide which files a job carries.
"""
