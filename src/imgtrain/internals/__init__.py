"""Adapters over private symbols of torch and Python that imgtrain needs for speed or exactness.

Each module wraps one private API and nothing else, so that an upgrade which changes it breaks one
place; tests/unit/test_internals.py is the canary that names the symbol when it does.
"""
