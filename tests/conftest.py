from __future__ import annotations

import sys
from pathlib import Path

# tests/ helpers (netns, tunbridge, scenario_runner) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
