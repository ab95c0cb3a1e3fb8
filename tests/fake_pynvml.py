"""Moved to the shared test-support package; this name stays importable for the tests that use it."""

import sys

import dgdn_testing.fake_pynvml as _module

sys.modules[__name__] = _module
