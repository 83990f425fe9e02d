"""A model built with normdrop layers trains to the same numbers as the same model with torch.nn layers."""

from __future__ import annotations

import pytest
import torch

import normdrop.nn as nd


def conv_net(layers) -> torch.nn.Module:
    # No bias before a BN: its true gradient is 0, and Adam would blow rounding noise in it up to full-size steps,
    # which makes two correct implementations drift apart.
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1, bias=False),
        layers.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 6, 3, padding=1, bias=False),
        layers.BatchNorm2d(6, momentum=None),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 8 * 8, 32, bias=False),
        layers.BatchNorm1d(32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    )


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_batch_norm_model_trains_to_the_same_numbers(backend, optimizer_name):
    torch.manual_seed(0)
    x = torch.randn(256, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) * 20).long().clamp(-5, 4) + 5
    torch.manual_seed(1)
    reference = conv_net(torch.nn)
    ours = conv_net(nd)
    ours.load_state_dict(reference.state_dict())
    histories = []
    for model in (reference, ours):
        optimizer = (
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            if optimizer_name == "sgd"
            else torch.optim.Adam(model.parameters(), lr=1e-2)
        )
        losses = []
        for step in range(40):
            batch = slice((step * 32) % 256, (step * 32) % 256 + 32)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            histories.append((losses, model(x), model.state_dict()))
    (ref_losses, ref_out, ref_state), (our_losses, our_out, our_state) = histories
    assert ref_losses[-1] < ref_losses[0] * 0.7, "the reference did not learn: the comparison would be vacuous"
    torch.testing.assert_close(our_losses, ref_losses, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(our_out, ref_out, rtol=1e-3, atol=1e-3)
    for key in ref_state:
        torch.testing.assert_close(our_state[key], ref_state[key], rtol=1e-3, atol=1e-3, msg=key)


def test_dropout_model_gets_the_same_gradients_as_torch_given_the_same_mask(backend):
    """Masks come from a different generator than torch's, so compare given a mask: with the same seed our layer
    draws the same mask twice; once it reveals the mask, then torch ops applying that mask are the oracle for the
    gradients of the whole network."""
    torch.manual_seed(0)
    linear, head = torch.nn.Linear(20, 30), torch.nn.Linear(30, 5)
    params = [*linear.parameters(), *head.parameters()]
    x = torch.randn(64, 20)
    p = 0.4

    def gradients(apply_dropout) -> list[torch.Tensor]:
        for param in params:
            param.grad = None
        hidden = torch.relu(linear(x)) + 0.1  # strictly positive, so dropped units are exactly the zeros
        head(apply_dropout(hidden)).square().sum().backward()
        return [param.grad.clone() for param in params]

    torch.manual_seed(123)
    mask = (nd.Dropout(p)(torch.ones(64, 30)) != 0).float()
    torch.manual_seed(123)
    ours = gradients(nd.Dropout(p))
    reference = gradients(lambda hidden: hidden * mask / (1 - p))
    assert 0 < mask.mean().item() < 1
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
