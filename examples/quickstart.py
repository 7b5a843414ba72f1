"""athooks quickstart: distil a ResNet-34 teacher into a ResNet-18 student with attention transfer.

Small and self-contained: random weights, random 32x32 data, 20 training steps on the CPU.
In real use the teacher is a trained network and the data comes from your own loader.

Run: python3 examples/quickstart.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F  # noqa: N812
import torchvision

from athooks import Distiller

STEPS = 20
BATCH = 8
PRINT_EVERY = 5


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    teacher = torchvision.models.resnet34(num_classes=10)  # stands in for a trained teacher
    student = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    # A fixed synthetic batch, so that the AT term can only fall by the student learning to
    # match the teacher's attention maps.
    x = torch.randn(BATCH, 3, 32, 32)
    y = torch.randint(0, 10, (BATCH,))

    start = time.perf_counter()
    history: list[float] = []
    with Distiller(teacher, student) as d:  # layers="auto": chosen on the first call
        for step in range(1, STEPS + 1):
            logits = student(x)  # the Distiller runs the teacher on x first
            if step == 1:  # at 32x32: layer1..layer3 (layer4 is 1x1, no spatial information)
                print("transferring attention at", d.pairs)
            ce = F.cross_entropy(logits, y)
            at = d.loss()  # the attention-transfer term of this step
            loss = ce + at
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            history.append(d.terms["at"].item())
            if step == 1 or step % PRINT_EVERY == 0:
                terms = {name: round(v.item(), 4) for name, v in d.terms.items()}
                print(f"step {step:2d}  ce {ce.item():.4f}  terms {terms}")

    first, last = history[0], history[-1]
    print(f"AT term: first step {first:.4f} -> last step {last:.4f}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    if not last < first:
        raise SystemExit("the AT term did not fall: something is wrong")


if __name__ == "__main__":
    main()
