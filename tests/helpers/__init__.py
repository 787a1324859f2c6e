"""Helpers shared by the test modules (imported as ``helpers.*``): tests never import each
other."""
