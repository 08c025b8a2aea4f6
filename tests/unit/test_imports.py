"""A driver process imports only what its device needs, and starts fast."""

import subprocess
import sys
import time


def test_driver_process_imports_no_heavy_ml_or_vision_stack():
    code = ("import sys, drivers.core.process, drivers.mock.arm; "
            "print(','.join(m for m in ('torch', 'cv2', 'lerobot', 'onnxruntime', 'transformers') if m in sys.modules))")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    elapsed = time.monotonic() - started
    assert out.stdout.strip() == "", f"the driver imported {out.stdout.strip()}"
    # Generous for a loaded CI box; a desktop takes about 0.5 s including the interpreter.
    assert elapsed < 5.0
