"""The causality check shared by the CPU and GPU attention tests."""

import contextlib

import torch


def assert_causal(attn, x, lengths, cuts, autocast=None):
    """``attn(x, lengths)`` at positions ``<= t`` does not change when every input after ``t`` changes, for each
    ``t`` in ``cuts``, in eval and in train mode (the same dropout draw for both inputs). ``autocast``: a dtype to
    run under ``torch.autocast`` on ``x``'s device, or None."""
    for train in (False, True):
        attn.train(train)

        def run(inputs):
            torch.manual_seed(1)  # the same dropout draw for both inputs
            with (torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext()):
                return attn(inputs, lengths).float()

        y = run(x)
        for t in cuts:
            x2 = x.clone()
            x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
            assert torch.equal(run(x2)[:, : t + 1], y[:, : t + 1]), (train, t)
