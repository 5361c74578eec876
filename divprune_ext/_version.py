# The one place the version is written: setup.py reads this file without importing
# the package (which needs torch and the compiled extension).
__version__ = "0.1.0"
