"""`import avatarq` stays cheap: no TensorRT, no nvdiffrast, no CUDA initialisation."""

import subprocess
import sys


def test_importing_avatarq_pulls_in_no_heavy_optional_module():
    code = (
        "import sys, avatarq, avatarq.cli; "
        "heavy = [m for m in ('tensorrt', 'tensorrt_rtx', 'nvdiffrast', 'onnxruntime', 'torch', 'pyfvvdp', 'pycvvdp') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
