import os
import sys

# Tests import shared helpers (steer_oracle, hook_reference) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
