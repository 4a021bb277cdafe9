"""Only here because cffi's setuptools hook (cffi_modules) is configured from setup()."""

from setuptools import setup

setup(cffi_modules=["cffi_build/build.py:ffibuilder"])
