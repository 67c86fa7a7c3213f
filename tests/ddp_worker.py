"""Worker of tests/test_ddp.py, run under torchrun: fine-tune a tiny tree with DDP (gloo) and write
each rank's weight digest. Usage: torchrun --nproc_per_node 2 tests/ddp_worker.py OUT EPOCHS [STOP]

With STOP the run is interrupted after epoch STOP (as a killed job would be), so a second call resumes it."""
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import sigmab_plugin as sb
from sigmab_plugin.adapters.cifar_resnet import cifar_resnet
from sigmab_plugin.finetune import FinetuneConfig, finetune


class Interrupted(Exception):
    pass


def _digest(model) -> str:
    return hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in model.state_dict().values())).hexdigest()


def main(out: str, epochs: int, stop: int = 0) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = cifar_resnet(20, 10, "B")
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(64, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    labels = torch.randint(0, 10, (64,), generator=g)
    norm = lambda x: x.float() / 127.5 - 1  # noqa: E731
    sb.branch(model, depth=2, calib_data=norm(images), progress=False)
    cfg = FinetuneConfig(epochs=epochs, batch_size=8, lr=0.05, progress=False, hard_epochs=2, distill_weight=0.0)
    seen = {}

    def on_epoch(row):
        seen.setdefault("epochs", []).append(row["epoch"])
        seen["digest"] = _digest(model)
        if row["epoch"] == stop:
            raise Interrupted

    try:
        history = finetune(model, images, labels, norm, cfg, out_dir=out, resume=True, on_epoch=on_epoch)
        seen = {"digest": _digest(model), "epochs": [h["epoch"] for h in history]}
    except Interrupted:
        pass
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
