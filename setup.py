# setuptools needs setup.py for cffi_modules: the native kernels are compiled when the package
# is built or installed (pip install -e . included), never at import on a user's machine.
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
