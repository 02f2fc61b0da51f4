import subprocess
import sys


def test_import_initialises_no_cuda_and_registers_everything():
    code = (
        "import torch, dilated_compile\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert hasattr(torch.ops.dilated_compile, 'dilated_attention')\n"
        "assert hasattr(torch.ops.dilated_compile, 'dilated_attention_backward')\n"
        "assert hasattr(torch.ops.dilated_compile, 'annotation')\n"
        "from torch._dynamo import list_backends\n"
        "assert 'dilated_compile' in list_backends(exclude_tags=())\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
