"""The patch-robustness demo: a small BagNet-9 on the crowded synthetic set (the class motif 6-9 times), CPU.

    python train.py --config configs/robust_demo.py --workdir runs/robust_demo
    python -m bagjax.experiments.patch_robustness --workdir runs/robust_demo --patch-size 1%,2%

A certificate needs class evidence that no single patch window holds (PatchGuard, Xiang et al. 2021, Sec. 3): on
the demo set one to three motifs of about a patch's size carry it all, so masking one window removes it and
almost nothing certifies. Here the motifs are spread over a 64 px image, and BagNet-9's 9 px receptive field
keeps the window of a 1 % patch at 2 x 2 of a 7 x 7 logit grid. ``configs/robust_demo.py:smoke`` runs two steps.
"""

from configs import demo
from configs import default


def get_config(arg: str | None = None):
    config = demo.get_config()
    config.dataset = "synthetic:crowded"
    config.model = "bagnet9"
    config.image_size = 64
    return default.with_arg(config, arg)
