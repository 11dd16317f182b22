import os
import sys

# benchmarks/ imports tests.utils-like helpers from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
