"""On CPU, memory a step frees is reused by the next step instead of coming back from the kernel as fresh pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# Training steps whose logits (4 x 128 x 32768 fp32 = 64 MiB) and their gradient are above glibc's largest
# automatic mmap threshold (32 MiB). Prints the minor page faults of steps 4-6, once the heap has settled.
STEPS = """
import resource, sys, torch
from ava.config.schema.model import ModelConfig
from ava.model import AvaForCausalLM
from ava.train.engine.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
cfg = ModelConfig.model_validate(dict(hidden_size=64, num_layers=1, num_attention_heads=4, intermediate_size=128,
                                      vocab_size=32768, max_position_embeddings=128))
model = AvaForCausalLM(cfg)
optimizer = torch.optim.AdamW(model.parameters())
ids = torch.randint(0, 32768, (4, 128))
for step in range(6):
    if step == 3:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


def _huge_pages_always() -> bool:
    """With transparent huge pages always on, fresh memory faults in 2 MiB pages: the counts below mean nothing."""
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc tuning: Linux only")
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages are 'always': page-fault counts differ")
def test_steps_stop_page_faulting_once_freed_memory_is_kept() -> None:
    logits_pages = 4 * 128 * 32768 * 4 // 4096
    default, kept = _faults("default"), _faults("keep")
    assert default >= 3 * logits_pages, f"untuned, every step maps its logits afresh: {default} faults in 3 steps"
    # A settled heap reuses what it freed; at most one block may still be placed afresh as the heap finds its shape.
    assert kept <= logits_pages * 1.25, f"with freed memory kept, settled steps reuse it: {kept} faults in 3 steps"
