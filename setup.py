"""Package discovery only (everything else is in pyproject.toml): the repository root is the package
`recur` and every folder with an __init__.py below it a subpackage, so adding a model family is
adding a folder under modeling/."""
import os

from setuptools import find_packages, setup

root = os.path.dirname(os.path.abspath(__file__))
setup(packages=["recur"] + [f"recur.{p}" for p in find_packages(root, exclude=["tests", "tests.*"])])
