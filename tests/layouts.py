"""A pruned network against its masked model in every layout and storage."""

import torch

LAYOUTS = (("union", "auto"), ("compact", "ragged"), ("compact", "padded"))


def per_domain_statistics(model, size: int) -> None:
    """Two training-mode passes over a mixed batch (3 domains) with a shifted,
    scaled input, so each domain's BatchNorm statistics become its own; then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(9, 3, size, size) * 2 + 0.5, torch.arange(9) % 3)
    model.eval()


def check_every_layout(pruned, model, what: str, size: int, **tol) -> None:
    """pruned(x, d) == model(x, d) in the union layout and both compact storages, on
    a mixed batch, one with no sample of domain 1, one domain given as an int, and a
    batch of one (model has at least 3 domains)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, size, size, generator=g)
    cases = {"mixed": (x, torch.tensor([0, 1, 2, 2, 1, 0, 0, 2])),
             "no samples of domain 1": (x, torch.tensor([0, 2, 2, 0, 0, 2, 2, 0])),
             "one domain (int)": (x, 1),
             "batch of one": (x[:1], torch.tensor([2]))}
    try:
        with torch.no_grad():
            for layout, storage in LAYOUTS:
                pruned.layout, pruned.storage = layout, storage
                for case, (xs, d) in cases.items():
                    torch.testing.assert_close(
                        pruned(xs, d), model(xs, d), **tol,
                        msg=lambda m, c=case, la=layout, s=storage: f"{what}, {la}/{s}, {c}: {m}")
    finally:
        pruned.layout, pruned.storage = "auto", "auto"
