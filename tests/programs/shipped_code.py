"""Compiled code that tests ship by value: imported by the calling worker
only, so the callee can be checked never to have imported it."""

import torch


@torch.jit.script
def scale_add(x: torch.Tensor, k: float) -> torch.Tensor:
    return x * k + 1.0


class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


class TwoHeads(torch.nn.Module):
    """An exported program's output structure: a dict holding a tuple."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x, y):
        h = self.linear(x)
        return {"sum": h + y, "pair": (h.relu(), y * 2)}


def scripted_module():
    return torch.jit.script(Affine())


def exported_program():
    x = torch.randn(2, 8)
    return torch.export.export(TwoHeads(), (x, torch.randn(2, 4)))
