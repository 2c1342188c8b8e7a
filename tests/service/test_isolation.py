"""The service stands alone: it never imports training/ and runs without scikit-learn (its roll is its own)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('sklearn', 'training'):
            raise ImportError(f'{name} is blocked for this test')
sys.meta_path.insert(0, Block())
import service.app, service.forward, service.field, service.swissroll  # noqa: E401
import numpy as np
print(service.swissroll.real_points(3, {'noise': 0.5, 'mean': [0, 0], 'std': [1, 1]}, np.random.default_rng(0)).shape)
"""


def test_service_imports_without_training_or_sklearn():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(3, 2)"
